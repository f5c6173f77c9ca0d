"""Samples per second of one headless run on 1 and on 2 data-parallel processes (``accelerate
launch``), on the tiny SD1 checkpoint (``tiny.write_tiny_checkpoint``), each process at the same
per-process batch: 2 processes train twice the samples per step. Prints the commands it ran.

    .venv/bin/python bench/data_parallel.py
    .venv/bin/python bench/data_parallel.py --steps 40 --channels 64 --resolution 128

On CPU each process gets ``--threads`` threads (default 1): 2 processes need 2 free cores to
show what they scale to. On a machine with N GPUs, run the printed ``accelerate launch`` line
with ``--num_processes N`` (and without ``--multi_gpu``: accelerate turns it on itself).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_dreambooth.config import TrainConfig  # noqa: E402
from lora_dreambooth.demo import draw_character, write_images  # noqa: E402
from lora_dreambooth.tiny import write_tiny_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], threads: int) -> tuple[float, float]:
    """(samples/s the run reported, wall seconds)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads))
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    rate = re.search(r"at ([0-9.]+) samples/s", done.stdout)
    return float(rate.group(1)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="samples per process per micro-batch")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--channels", type=int, default=32, help="the UNet's model_channels (SD: 320)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-dp-") as work:
        checkpoint = write_tiny_checkpoint(os.path.join(work, "checkpoint"), model_channels=args.channels)
        config = TrainConfig(trigger="wpg", instance_dir=write_images(os.path.join(work, "images"), draw_character, 8),
                             steps=args.steps, batch_size=args.batch, rank=8, alpha=8.0, resolution=args.resolution,
                             learning_rate=1e-4, save_optimizer=False, overwrite=True)
        settings = os.path.join(work, "run.json")
        with open(settings, "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f)
        train = ["-m", "lora_dreambooth", "train", "--settings", settings, "--checkpoint", checkpoint]
        accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
        runs = {
            1: [sys.executable, *train, "--out", os.path.join(work, "one")],
            2: [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                *train, "--out", os.path.join(work, "two")],
        }
        results = {n: run(argv, args.threads) for n, argv in runs.items()}
    print(f"\ntiny SD1 (model_channels {args.channels}), {args.resolution} px, batch {args.batch} per process, "
          f"{args.steps} steps, {args.threads} thread(s) per process, torch on CPU")
    print(f"{'processes':>9}  {'samples/step':>12}  {'samples/s':>9}  {'wall s':>6}  speed-up")
    for n, (rate, wall) in results.items():
        print(f"{n:>9}  {n * args.batch:>12}  {rate:>9.2f}  {wall:>6.1f}  {rate / results[1][0]:.2f}×")


if __name__ == "__main__":
    main()
