"""Seconds per step of our training loop vs a bare UNet forward + backward + AdamW step with the
same adapters, on the same model and shape, measured in one run; plus peak memory of each.

    .venv/bin/python bench/step_overhead.py                      # tiny SD1 widths
    .venv/bin/python bench/step_overhead.py --sd15-widths        # SD1.5 UNet widths, random weights
    .venv/bin/python bench/step_overhead.py --checkpointing      # with gradient checkpointing
    .venv/bin/python bench/step_overhead.py --family sdxl        # SDXL-shaped tiny model

The two are timed in alternating rounds (bare, loop, bare, loop, ...) and compared by their
median step time, so a noisy machine affects both alike; peak memory is measured in one
further run of each, with and without gradient checkpointing. Our loop's time per step is the
time between consecutive progress callbacks: data, noise, timesteps, conditioning lookup,
loss, backward, clipping, AdamW, LR schedule and the loss log. Goal: ratio ≤ 1.05.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import bare_steps, loop_steps  # noqa: E402
from lora_dreambooth.config import TrainConfig  # noqa: E402
from lora_dreambooth.demo import draw_character, write_images  # noqa: E402
from lora_dreambooth.tiny import build_tiny_sd1, write_tiny_clip  # noqa: E402
from tests.tiny_models import build_tiny_sdxl  # noqa: E402


class PeakMemory:
    """Peak memory of a run: on a GPU the CUDA allocator's peak above the level at entry; on the
    CPU (where torch keeps no allocator statistics and the process's resident set mostly shows
    pages kept from earlier runs) the peak of activation bytes held for backward — tensors
    autograd saved, each storage once, model weights excluded — which is what batch size,
    resolution and gradient checkpointing change."""

    def __init__(self, device: torch.device, model: torch.nn.Module):
        self.device = device
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.peak_bytes = 0
        self._live: dict[int, list[int]] = {}  # storage → [refcount, bytes]
        self._total = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - start
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor):
            yield

    def _pack(self, tensor: torch.Tensor) -> "_Saved":
        return _Saved(tensor, self)

    def _add(self, key: int, size: int) -> None:
        if key in self.weights:
            return
        entry = self._live.setdefault(key, [0, size])
        entry[0] += 1
        if entry[0] == 1:
            self._total += size
            self.peak_bytes = max(self.peak_bytes, self._total)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self._total -= entry[1]
            del self._live[key]


class _Saved:
    """A tensor autograd keeps for backward, counted while it lives."""

    def __init__(self, tensor: torch.Tensor, meter: PeakMemory):
        storage = tensor.untyped_storage()
        self.tensor, self.meter, self.key = tensor, meter, storage.data_ptr()
        meter._add(self.key, storage.nbytes())

    def __del__(self) -> None:
        self.meter._release(self.key)


def build_model(family: str, sd15_widths: bool, work: str):
    if family == "sdxl":
        return build_tiny_sdxl(), "tiny SDXL-shaped"
    if sd15_widths:
        clip_dir = os.path.join(work, "clip")
        os.makedirs(clip_dir)
        write_tiny_clip(clip_dir, hidden=768, layers=2, heads=12)
        return build_tiny_sd1(clip_dir=clip_dir, model_channels=320, channel_mult=(1, 2, 4, 4),
                              context_dim=768), "SD1.5 widths"
    return build_tiny_sd1(), "tiny SD1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument("--sd15-widths", action="store_true",
                        help="SD1.5 UNet widths (320, ×1 ×2 ×4 ×4, context 768), random weights")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps dropped at the start of every round, for both: first-touch "
                             "allocations of new adapters and optimizer state")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--network", default="lora")
    parser.add_argument("--checkpointing", action="store_true", help="time both with gradient checkpointing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-")
    model, shape = build_model(args.family, args.sd15_widths, work)
    model.to(args.device)
    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
    images = write_images(os.path.join(work, "images"), draw_character, 4)
    config = TrainConfig(trigger="wpg", instance_dir=images, steps=args.warmup + args.steps + 1,
                         batch_size=args.batch, resolution=args.resolution, network=args.network,
                         rank=32, alpha=32.0, learning_rate=1e-4,
                         gradient_checkpointing=args.checkpointing, overwrite=True)

    bare: list[float] = []
    ours: list[float] = []
    for round_no in range(args.rounds):  # timing rounds: no memory sampler running
        bare += bare_steps(model, config, args.warmup + args.steps)[args.warmup:]
        ours += loop_steps(model, config, os.path.join(work, f"round{round_no}"))[args.warmup:]
    device = torch.device(args.device)
    memory = {}
    for label, run in (("bare", lambda c: bare_steps(model, c, args.steps)),
                       ("loop", lambda c: loop_steps(model, c, os.path.join(work, "memory")))):
        for checkpointing in (False, True):  # one more run each, sampled
            meter = PeakMemory(device, model)
            with meter.measure():
                run(dataclasses.replace(config, gradient_checkpointing=checkpointing))
            memory[label, checkpointing] = meter.peak_bytes / 2 ** 20

    bare_median, ours_median = statistics.median(bare), statistics.median(ours)
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"model: {shape} UNet ({unet_params:.1f} M params), device {args.device}, "
          f"{args.resolution}px, batch {args.batch}, {args.network} rank 32, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, torch threads {torch.get_num_threads()}")
    print(f"bare UNet fwd+bwd+AdamW : median {bare_median * 1000:8.1f} ms/step over {len(bare)} steps")
    print(f"our training loop       : median {ours_median * 1000:8.1f} ms/step over {len(ours)} steps")
    print(f"ratio loop / bare       : {ours_median / bare_median:.3f}  (goal ≤ 1.05)")
    for label in ("bare", "loop"):
        print(f"peak memory {label:4s}        : +{memory[label, False]:.0f} MiB without checkpointing, "
              f"+{memory[label, True]:.0f} MiB with")


if __name__ == "__main__":
    main()
