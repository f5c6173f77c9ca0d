"""Memory a run holds on to: the process's resident set (and CUDA allocated memory where a GPU
is present) before, at its peak during, and after each of back-to-back runs through the host
job in the A1111 stand-in (done, cancelled and failed runs in turn). Goals: after a run ≤ 100 MiB
above idle, no growth beyond 50 MiB over 20 runs, peak ≤ 1.5 GiB above idle for a 64 px SD1.5 run.

    .venv/bin/python bench/memory.py                       # SD1.5-sized, 20 runs of 1 step
    .venv/bin/python bench/memory.py --model tiny --runs 20
    .venv/bin/python bench/memory.py --no-trim             # without returning free heap pages to the OS

"Idle" is the resident set after the model is loaded and one warm-up run has loaded what any
first run loads (libraries' lazy state, allocator pools), as A1111 is after its first
generation. The peak is sampled every 5 ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from a1111_stub.harness import enter_stand_in, load_model_as_a1111  # noqa: E402
from bench import full_size  # noqa: E402
from bench.full_size import sd15_model  # noqa: E402
from lora_dreambooth import loop, memory  # noqa: E402
from lora_dreambooth.config import TrainConfig  # noqa: E402
from lora_dreambooth.demo import draw_character, write_images  # noqa: E402
from lora_dreambooth.tiny import build_tiny_sd1  # noqa: E402

MIB = 2 ** 20
OUTCOMES = ("done", "cancelled", "failed")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def a1111_backup_gib(family: str, bytes_per_value: int) -> float:
    """GiB A1111's Lora extension copies to RAM the first time a LoRA is applied: the parameters
    of every layer whose forward it patches (Linear, Conv2d, GroupNorm, LayerNorm,
    MultiheadAttention) in the UNet and text encoders, from the real shapes."""
    patched = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
    with torch.device("meta"):
        parts = full_size.parts(family)
    values = sum(p.numel() for name, part in parts.items() if name != "vae" for m in part.modules()
                 if isinstance(m, patched) for p in m.parameters(recurse=False))
    return values * bytes_per_value / 2 ** 30


def _ending(outcome: str, job):
    """The ``loop.TrainingLoop._step`` that ends a run as ``outcome`` after its first step."""
    real = loop.TrainingLoop._step

    def step(self, *args):
        if self.losses and outcome == "cancelled":
            job.cancel()
        loss = real(self, *args)
        if outcome == "failed":
            raise RuntimeError("failed after a step, with its optimizer state alive")
        return loss
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--no-trim", action="store_true")
    args = parser.parse_args()
    if args.no_trim:
        memory._trim_heap = lambda: None

    work = tempfile.mkdtemp(prefix="bench-memory-")
    a1111 = enter_stand_in(work)
    from lora_dreambooth.host import job as job_module

    model = load_model_as_a1111(a1111.shared, sd15_model(work) if args.model == "sd15" else build_tiny_sd1())
    images = os.path.join(work, "images")
    write_images(images, lambda seed: draw_character(seed, args.resolution), 4)
    cuda = torch.cuda.is_available()
    job = job_module.TrainingJob()

    def run(outcome: str) -> tuple[str, int]:
        config = TrainConfig(trigger="wpg", instance_dir=images, steps=2, resolution=args.resolution, rank=4,
                             alpha=4.0, preview_every=0, learning_rate=1e-4, overwrite=True)
        loop.TrainingLoop._step = _ending(outcome, job)
        assert job.claim(outcome, config)
        with PeakSampler() as sampler:
            status = job.run(job_module.RunRequest(config))
        assert status.state == outcome, (outcome, status.state, status.error)
        return status.state, sampler.peak

    real_step = loop.TrainingLoop._step
    cold = rss()
    run("done")  # warm-up
    loop.TrainingLoop._step = real_step
    idle = rss()
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"model: {args.model}, {args.resolution} px, 2 steps a run, heap trim {'off' if args.no_trim else 'on'}; "
          f"idle RSS {idle / MIB:.0f} MiB (before the warm-up run {cold / MIB:.0f} MiB: "
          f"{(idle - cold) / MIB:+.0f} MiB of first-use state)")
    print(" run  outcome     RSS after  vs idle   peak vs idle" + ("  CUDA allocated" if cuda else ""))
    afters = []
    for i in range(args.runs):
        outcome, peak = run(OUTCOMES[i % len(OUTCOMES)])
        loop.TrainingLoop._step = real_step
        after = rss()
        afters.append(after)
        gpu = f"  {torch.cuda.memory_allocated() / MIB:10.0f} MiB" if cuda else ""
        print(f"{i + 1:4d}  {outcome:10s} {after / MIB:7.0f} MiB  {(after - idle) / MIB:+6.0f} MiB"
              f"  {(peak - idle) / MIB:+8.0f} MiB{gpu}")
    print(f"largest after-run excess {(max(afters) - idle) / MIB:+.0f} MiB (goal ≤ 100); growth from run 1 to "
          f"{args.runs}: {(afters[-1] - afters[0]) / MIB:+.0f} MiB (goal ≤ 50)")
    print("A1111's own cost at the first txt2img with any LoRA (its Lora extension's weight backups in RAM): "
          + ", ".join(f"{family} {a1111_backup_gib(family, size):.1f} GiB in {dtype}"
                      for family in ("sd15", "sdxl") for dtype, size in (("fp16", 2), ("fp32", 4))))
    del model


if __name__ == "__main__":
    main()
