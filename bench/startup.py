"""Seconds from pressing Start to the first optimizer step done, on the host path the tab uses
(``request_problems`` → ``claim`` → ``TrainingJob.run``, in the A1111 stand-in of tests/), with
an SD1.5-sized model (``full_size.sd15_model``), 4 images at 64 px, LoRA rank 4, and where the
time goes. Goal: start → first step ≤ 3 s plus latent encoding.

    .venv/bin/python bench/startup.py
    .venv/bin/python bench/startup.py --resolution 512 --images 8

Each part is timed by wrapping the function that does it; "other" is what no part covers
(claims, run folder, config.json, optimizer and schedule set-up, callbacks).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from a1111_stub.harness import enter_stand_in, load_model_as_a1111  # noqa: E402
from bench.full_size import sd15_model  # noqa: E402
from lora_dreambooth import guard, loop, train  # noqa: E402
from lora_dreambooth.config import TrainConfig  # noqa: E402
from lora_dreambooth.data import DreamBoothDataset  # noqa: E402
from lora_dreambooth.demo import draw_character, write_images  # noqa: E402

#: (label, owner, attribute): the parts of the way to the first step, in order.
PARTS = (("checks", None, "request_problems"),
         ("guard (snapshot)", guard.ModelSnapshot, "take"),
         ("reading images", DreamBoothDataset, "__init__"),
         ("adapter injection", train, "inject"),
         ("encoding latents", DreamBoothDataset, "cache_latents"),
         ("conditionings", loop.TrainingLoop, "_prompt_cache"),
         ("first step", loop.TrainingLoop, "_step"))


class Clock:
    """Seconds spent in each wrapped function, and when each first returned."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.first_end: dict[str, float] = {}

    def wrap(self, owner, attribute: str, label: str) -> None:
        real: Callable = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        inner = real.__func__ if isinstance(real, classmethod) else real

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                now = time.perf_counter()
                self.spent[label] += now - started
                self.first_end.setdefault(label, now)

        setattr(owner, attribute, classmethod(timed) if isinstance(real, classmethod) else timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-startup-")
    a1111 = enter_stand_in(work)
    from lora_dreambooth.host import job as job_module

    built = time.perf_counter()
    model = load_model_as_a1111(a1111.shared, sd15_model(work))
    built = time.perf_counter() - built
    images = os.path.join(work, "images")
    write_images(images, lambda seed: draw_character(seed, args.resolution), args.images)
    config = TrainConfig(trigger="wpg", instance_dir=images, steps=1, resolution=args.resolution, rank=args.rank,
                         alpha=float(args.rank), preview_every=0, batch_size=1, learning_rate=1e-4)

    clock = Clock()
    for label, owner, attribute in PARTS:
        clock.wrap(owner or job_module, attribute, label)
    clock.wrap(guard.ModelSnapshot, "verify", "guard (check after)")
    job = job_module.TrainingJob()

    started = time.perf_counter()  # what the tab's Start does (ui.py), inside the GPU queue lock
    problems = job_module.prepare_resume(config) + job_module.request_problems(config)
    assert not problems, problems
    assert job.claim("bench", config)
    with a1111.call_queue.queue_lock:
        status = job.run(job_module.RunRequest(config))
    ended = time.perf_counter()
    assert status.state == "done", status.error

    first_step = clock.first_end["first step"] - started
    parts = [label for label, *_ in PARTS]
    unet = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"model: SD1.5-sized ({unet:.0f} M UNet params, built in {built:.0f} s), fp32 CPU, "
          f"{torch.get_num_threads()} threads; {args.images} images at {args.resolution} px, LoRA rank {args.rank}")
    print("start → first optimizer step done:")
    for label in parts:
        print(f"  {label:20s} {clock.spent[label]:6.2f} s")
    print(f"  {'other':20s} {first_step - sum(clock.spent[label] for label in parts):6.2f} s")
    print(f"  {'total':20s} {first_step:6.2f} s; without latent encoding "
          f"{first_step - clock.spent['encoding latents']:.2f} s (goal ≤ 3 s); before the first step starts "
          f"{first_step - clock.spent['first step']:.2f} s")
    print(f"after the step: guard (check after) {clock.spent['guard (check after)']:.2f} s; "
          f"whole run {ended - started:.2f} s")

if __name__ == "__main__":
    main()
