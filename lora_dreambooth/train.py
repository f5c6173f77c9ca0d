"""The training loop (being written by the lead): API below is fixed, the host codes against it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from PIL import Image

from .config import TrainConfig


class TrainingError(RuntimeError):
    """Training failed: the model was restored and nothing was written."""


@dataclass
class Progress:
    step: int            # optimizer updates done
    total: int           # config.steps
    loss: float          # mean loss of the last step
    lr: float            # current UNet learning rate
    samples_per_s: float
    eta_s: float
    phase: str = "training"  # "loading" | "caching" | "training" | "saving"


@dataclass
class TrainCallbacks:
    on_progress: Optional[Callable[[Progress], None]] = None
    # Renders a preview at `step` with the adapter active; None → the engine's own sampler.
    render_preview: Optional[Callable[[int], Image.Image]] = None
    on_preview: Optional[Callable[[int, Image.Image, str], None]] = None  # (step, image, saved path)
    should_stop: Callable[[], bool] = field(default=lambda: False)  # checked every micro-batch
    on_log: Optional[Callable[[str], None]] = None


@dataclass
class TrainResult:
    path: str             # the .safetensors written
    sidecar_path: str     # <name>.json
    name: str             # final name (name, name-1, ...)
    steps_done: int
    cancelled: bool
    losses: list[float]
    previews: list[str]   # preview image paths in run_dir
    run_dir: str


def train_lora(model, config: TrainConfig, lora_dir: str, run_dir: str,
               callbacks: Optional[TrainCallbacks] = None) -> TrainResult:
    """Train an adapter in place on `model` (ldm LatentDiffusion, plain or A1111-wrapped),
    write `<lora_dir>/<name>.safetensors` + `<name>.json`, previews / loss.csv / config.json in
    `run_dir`. Stop (should_stop) saves what was trained; any exception restores the model,
    writes nothing and raises TrainingError. The model is restored bit-identically either way."""
    raise NotImplementedError
