"""Seconds the model guard costs per run (``ModelSnapshot.take`` before, ``verify`` after: one
read of every weight each) at full-size SD1.5 and SDXL base shapes. Goal: ≤ 0.5 s per run at
SD1.5 widths on CPU.

    .venv/bin/python bench/guard.py                     # SD1.5 fp32 and SDXL fp16, CPU
    .venv/bin/python bench/guard.py --sha256            # + the old guard (4 sha256 passes of host copies)
    .venv/bin/python bench/guard.py --plain             # + one pass of plain sums (the positional term's cost)
    .venv/bin/python bench/guard.py --device cuda       # where a GPU is present

The tensors are real (allocated and written; see ``full_size.state_of``). ``--sha256`` times
sha256 over the first 1 GiB and scales it to the model's bytes × 4 passes (what the host and
the engine each did before and after a run). ``--plain`` times one pass of plain int64 sums,
without the guard's position-weighted row sums, to show what that term costs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.full_size import describe, state_of  # noqa: E402
from bench.harness import sync  # noqa: E402
from lora_dreambooth.guard import ModelSnapshot  # noqa: E402


def guard_seconds(model: torch.nn.Module, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of (snapshot, verify)."""
    takes, checks = [], []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        snapshot = ModelSnapshot.take(model)
        sync(device)
        taken = time.perf_counter()
        assert snapshot.verify(model) == []
        sync(device)
        takes.append(taken - started)
        checks.append(time.perf_counter() - taken)
    return statistics.median(takes), statistics.median(checks)


def sha256_seconds(model: torch.nn.Module, sample_bytes: int = 2 ** 30) -> float:
    """The old guard's sha256 (of host copies), one pass over the whole model, scaled from a sample."""
    done, started = 0, time.perf_counter()
    for tensor in model.state_dict().values():
        if done >= sample_bytes:
            break
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        hashlib.sha256(data).digest()
        done += data.size
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return (time.perf_counter() - started) * total / done


def plain_seconds(model: torch.nn.Module, device: torch.device) -> float:
    """One pass of plain int64 word sums (no position-weighted row sums)."""
    sync(device)
    started = time.perf_counter()
    sums = [t.detach().reshape(-1).view(torch.int64).sum() for t in model.state_dict().values()
            if t.numel() * t.element_size() % 8 == 0]
    torch.stack(sums).cpu()
    sync(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", default="sd15:float32,sdxl:float16",
                        help="family:dtype pairs (sd15, sdxl; float32, float16, bfloat16)")
    parser.add_argument("--sha256", action="store_true")
    parser.add_argument("--plain", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for pair in args.families.split(","):
        family, dtype = pair.split(":")
        model = state_of(family, getattr(torch, dtype), device)
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        take, check = guard_seconds(model, device, args.repeats)
        print(f"{family} {dtype} ({describe(model)}):")
        print(f"  guard per run      : {take + check:6.2f} s  (snapshot {take:.2f} s + check {check:.2f} s, "
              f"{2 * size / (take + check) / 1e9:.1f} GB/s; median of {args.repeats})")
        if args.plain:
            print(f"  plain sums, 1 pass : {plain_seconds(model, device):6.2f} s  "
                  f"(the guard's snapshot: {take:.2f} s)")
        if args.sha256:
            old = 4 * sha256_seconds(model)
            print(f"  old sha256 guard   : {old:6.2f} s per run (4 passes, extrapolated)  "
                  f"ratio old/new {old / (take + check):.0f}x")
        del model


if __name__ == "__main__":
    main()
