"""The run folder of one training run: ``config.json``, ``loss.csv`` (one row per step) and
the preview images, each written as it comes so a stopped or failed run still shows its course."""
from __future__ import annotations

import csv
import datetime
import json
import os
from typing import Optional

from PIL import Image

from . import export
from .config import TrainConfig


class RunFiles:
    """The run folder: config.json, loss.csv (one row per step) and preview images. With
    ``write`` off (the other processes of a data-parallel run) nothing is written."""

    def __init__(self, run_dir: str, config: TrainConfig, write: bool = True):
        self.run_dir = run_dir
        self.write = write
        self.previews: list[str] = []
        self.last_preview: Optional[Image.Image] = None
        if not write:
            return
        export.atomic_write(os.path.join(run_dir, "config.json"),
                            lambda tmp: _write_json(tmp, config.to_dict()))
        self.loss_path = os.path.join(run_dir, "loss.csv")
        with open(self.loss_path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["step", "loss", "lr"])

    def add_loss(self, step: int, loss: float, lr: float) -> None:
        if not self.write:
            return
        with open(self.loss_path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([step, f"{loss:.6f}", f"{lr:.3e}"])

    def add_preview(self, step: int, image: Image.Image) -> str:
        path = os.path.join(self.run_dir, f"preview-{step:05d}.png")
        export.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        self.previews.append(path)
        self.last_preview = image
        return path


def new_run_dir(root: str, name: str) -> str:
    """``<root>/<name>-<YYYYmmdd-HHMMSS>`` (``-2``… if taken), not created: the engine creates it."""
    base = os.path.join(root, f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
