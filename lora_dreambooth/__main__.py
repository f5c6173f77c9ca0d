"""Command line: ``python -m lora_dreambooth demo --out DIR``."""
import sys

COMMANDS = ("demo",)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m lora_dreambooth demo --out DIR [--steps N] [--network TYPE]")
        return 2
    from .demo import main as demo
    return demo(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
