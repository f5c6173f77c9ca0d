"""Command line: ``python -m lora_dreambooth demo --out DIR`` (the engine on a tiny model) and
``python -m lora_dreambooth train --settings run.json --checkpoint MODEL.safetensors --out DIR
[--webui A1111_DIR]`` (a headless run; under ``accelerate launch`` a data-parallel one)."""
import sys

COMMANDS = ("demo", "train")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m lora_dreambooth demo --out DIR [--steps N] [--network TYPE]\n"
              "       python -m lora_dreambooth train --settings run.json --checkpoint MODEL.safetensors "
              "--out DIR [--webui A1111_DIR] [--no-half]")
        return 2
    if argv[0] == "train":
        from .headless import main as train
        return train(argv[1:])
    from .demo import main as demo
    return demo(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
