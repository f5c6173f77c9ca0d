"""``python -m lora_dreambooth demo --out DIR``: the whole engine on a tiny model, on CPU.

Builds a tiny SD1-layout ldm model (random weights, same classes A1111 uses), draws a handful
of instance pictures of a "character" and some class pictures, trains ~30 steps with prior
preservation and a preview every 10 steps, and writes ``DIR/<name>.safetensors``,
``DIR/<name>.json`` and the previews (``DIR/run/``). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from . import networks
from .config import TrainConfig
from .train import Progress, TrainCallbacks, train_lora


def draw_character(seed: int, size: int = 64) -> Image.Image:
    """An orange disc with two eyes on a random pastel background: the 'character'."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(150, 255, 3)))
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.25, 0.35)
    cx, cy = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(240, 120, 20))
    for dx in (-r / 3, r / 3):
        draw.ellipse((cx + dx - 3, cy - r / 4 - 3, cx + dx + 3, cy - r / 4 + 3), fill=(0, 0, 0))
    return image


def draw_class_image(seed: int, size: int = 64) -> Image.Image:
    """Random shapes in random colours: stand-ins for generated class images."""
    rng = np.random.default_rng(1000 + seed)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        corner = rng.integers(0, size // 2, 2)
        x0, y0 = (int(v) for v in corner)
        x1, y1 = (int(v) for v in corner + rng.integers(8, size // 2, 2))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def write_images(folder: str, draw, count: int) -> str:
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        draw(i).save(os.path.join(folder, f"{i:02d}.png"))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_dreambooth demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the LoRA file, sidecar and previews")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--network", default="lora", choices=networks.NAMES)
    parser.add_argument("--name", default="wpg")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    from .tiny import build_tiny_sd1, write_tiny_clip  # imports ldm, which is slow: time it with the build
    with tempfile.TemporaryDirectory(prefix="lora-demo-") as work:  # images and CLIP, removed after
        model = build_tiny_sd1(seed=0, clip_dir=write_tiny_clip(os.path.join(work, "clip")))
        built = time.perf_counter()
        print(f"tiny SD1 model built in {built - started:.1f} s "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")

        config = TrainConfig(
            trigger=args.name, class_prompt="a photo of a person", regularization=0.5,
            instance_dir=write_images(os.path.join(work, "instance"), draw_character, 4),
            class_dir=write_images(os.path.join(work, "class"), draw_class_image, 4),
            steps=args.steps, learning_rate=1e-3, batch_size=2, rank=8, alpha=8.0, network=args.network,
            resolution=64, preview_every=10, preview_steps=10, seed=1, overwrite=True,
        )
        step_started = [time.perf_counter()]

        def on_progress(p: Progress) -> None:
            if p.phase == "training":
                now = time.perf_counter()
                print(f"step {p.step:3d}/{p.total}  loss {p.loss:.4f}  lr {p.lr:.1e}  "
                      f"{p.samples_per_s:5.1f} samples/s  {now - step_started[0]:.2f} s/step  eta {p.eta_s:.0f} s")
                step_started[0] = now

        callbacks = TrainCallbacks(on_progress=on_progress, on_log=lambda m: print(f"  {m}"),
                                   on_preview=lambda step, image, path: print(f"  preview {path}"))
        os.makedirs(args.out, exist_ok=True)
        result = train_lora(model, config, args.out, os.path.join(args.out, "run"), callbacks)
        finished = time.perf_counter()
        print(f"trained {result.steps_done} steps in {finished - built:.1f} s "
              f"(total {finished - started:.1f} s)")
        print(f"wrote {result.path}\nwrote {result.sidecar_path}")
        for path in result.previews:
            print(f"wrote {path}")
    return 0
