"""The DreamBooth task measured on the world's base model, and the figures of one run.

Four pictures of the character (``draw_character`` seeds 0-3, caption "circle" beside each,
so the instance prompt is "wpg, circle"), trigger ``wpg``, class prompt ``circle`` with class
images the base model draws itself (DPM++ 2M, 20 steps, CFG 5, as the tab's *Generate class
images* does), trained by ``train_lora`` as the tab calls it.

A run is read through the judge on pictures sampled the way previews are (``sampling``):
- fidelity: ``wpg circle`` pictures judged to be the character;
- class drift: ``a circle`` pictures judged to be the character, and the total variation
  distance of their (shape, colour) distribution from the base model's; next to it the
  contamination grid's own figure (``grid.moved_percent``, base vs trained, same seeds);
- everything else: adherence on prompts of the other shapes (``a blue square``…).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_dreambooth import torch_compat
from lora_dreambooth.config import TrainConfig, apply_preset
from lora_dreambooth.embedding import install_pivot, load_vectors
from lora_dreambooth.grid import moved_percent
from lora_dreambooth.model import make_backend
from lora_dreambooth.targets import find_targets
from lora_dreambooth.train import TrainCallbacks, train_lora

from . import judge as judging
from . import sampling, world

TRIGGER, CLASS = "wpg", "circle"
FIDELITY_PROMPT, CLASS_EVAL_PROMPT = "wpg circle", "a circle"
UNRELATED = tuple(t for t in world.ALL_THINGS if t.shape != "circle")
CLASS_IMAGE_COUNT = 4  # the tab's default number of class images to generate


@dataclass(frozen=True)
class Probe:
    """How many pictures a run is read from."""

    seeds: int = 64            # of ``wpg circle`` and of ``a circle``
    unrelated_seeds: int = 4   # of each of the 18 unrelated things (0: none)
    first_seed: int = 1_000    # sampling seeds count up from here (class images use 0…count-1)


@dataclass
class Samples:
    fidelity: torch.Tensor
    klass: torch.Tensor
    unrelated: torch.Tensor


@dataclass(frozen=True)
class Figures:
    fidelity: float           # wpg circle judged the character
    class_character: float    # a circle judged the character
    class_tv: float           # a circle (shape, colour) distribution vs the base model's
    class_moved: float        # the contamination grid's "moved" % for a circle, mean over seeds
    unrelated: float          # adherence on the other shapes' prompts (nan: none sampled)


def low_precision(model: torch.nn.Module) -> Optional[torch.dtype]:
    dtype = model.model.diffusion_model.input_blocks[0][0].weight.dtype
    return None if dtype == torch.float32 else dtype


def draw_fidelity_samples(model: torch.nn.Module, probe: Probe) -> torch.Tensor:
    """The ``wpg circle`` pictures alone (what fidelity is read from)."""
    seeds = [probe.first_seed + i for i in range(probe.seeds)]
    with torch_compat.autocast("cpu", low_precision(model)):
        return sampling.sample(make_backend(model), [FIDELITY_PROMPT] * len(seeds), seeds)


def draw_samples(model: torch.nn.Module, probe: Probe) -> Samples:
    """The pictures a run is read from, with whatever adapters ``model`` holds now."""
    fidelity = draw_fidelity_samples(model, probe)
    backend = make_backend(model)
    seeds = [probe.first_seed + i for i in range(probe.seeds)]
    unrelated = [t for t in UNRELATED for _ in range(probe.unrelated_seeds)]
    with torch_compat.autocast("cpu", low_precision(model)):
        return Samples(
            fidelity,
            sampling.sample(backend, [CLASS_EVAL_PROMPT] * len(seeds), seeds),
            sampling.sample(backend, [t.caption for t in unrelated], [probe.first_seed + i for i in range(len(unrelated))]))


def figures(judge: judging.Judge, samples: Samples, base: Samples, probe: Probe) -> Figures:
    klass = judging.read(judge, samples.klass)
    moved = [moved_percent(_pil(a), _pil(b)) for a, b in zip(base.klass, samples.klass)]
    unrelated = [t for t in UNRELATED for _ in range(probe.unrelated_seeds)]
    return Figures(
        fidelity=judging.read(judge, samples.fidelity).fraction_character(),
        class_character=klass.fraction_character(),
        class_tv=judging.total_variation(judging.read(judge, base.klass).distribution(), klass.distribution()),
        class_moved=float(np.mean(moved)),
        unrelated=judging.read(judge, samples.unrelated).adherence(unrelated) if unrelated else float("nan"))


def _pil(picture_u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(picture_u8.permute(1, 2, 0).numpy())


# --- the data -----------------------------------------------------------------------------

def write_instance_images(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    for i in range(4):
        world.draw(world.CHARACTER, i).save(os.path.join(folder, f"{i:02d}.png"))
        with open(os.path.join(folder, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(CLASS)
    return folder


def write_class_images(model: torch.nn.Module, folder: str, count: int = CLASS_IMAGE_COUNT) -> str:
    """The base model's own pictures of the class prompt, as *Generate class images* makes them."""
    os.makedirs(folder, exist_ok=True)
    with torch_compat.autocast("cpu", low_precision(model)):
        pictures = sampling.sample(make_backend(model), [CLASS] * count, list(range(count)))
    for i, picture in enumerate(pictures):
        _pil(picture).save(os.path.join(folder, f"class-{i:02d}.png"))
    return folder


def prepare_task(model: torch.nn.Module, work: str, probe: Probe, class_images: int = CLASS_IMAGE_COUNT) -> Samples:
    """The task's pictures under ``work`` (``instance/``, and ``class/`` drawn by ``model``, where
    ``train_and_sample`` reads them) and the base model's samples every run is read against."""
    write_instance_images(os.path.join(work, "instance"))
    write_class_images(model, os.path.join(work, "class"), class_images)
    return draw_samples(model, probe)


# --- one run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One training run of the table."""

    network: str = "lora"
    preset: str = "Dedicated"
    text_encoder: bool = False
    pivotal: bool = False
    precision: str = "fp32"
    regularization: Optional[float] = None  # None: the preset's
    steps: Optional[int] = None             # None: the preset's
    learning_rate: Optional[float] = None   # None: the preset's
    batch_size: Optional[int] = None        # None: the preset's

    @property
    def label(self) -> str:
        parts = [self.network, self.preset]
        if self.regularization is not None:
            parts.append(f"reg {self.regularization:g}")
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:g}")
        if self.batch_size is not None:
            parts.append(f"batch {self.batch_size}")
        parts += ["TE" if self.text_encoder else "", "pivotal" if self.pivotal else "",
                  self.precision if self.precision != "fp32" else ""]
        return " · ".join(p for p in parts if p)

    def config(self, instance_dir: str, class_dir: str, name: str) -> TrainConfig:
        config = apply_preset(TrainConfig(
            trigger=TRIGGER, name=name, instance_dir=instance_dir, class_dir=class_dir, class_prompt=CLASS,
            network=self.network, train_text_encoder=self.text_encoder, pivotal=self.pivotal,
            precision="auto", resolution=world.SIZE, seed=1, overwrite=True), self.preset)
        changes = {name: getattr(self, name) for name in ("regularization", "steps", "learning_rate", "batch_size")
                   if getattr(self, name) is not None}
        return dataclasses.replace(config, **changes)


@dataclass
class RunResult:
    samples: Samples   # read in process, adapters active, at the last step
    path: str          # the LoRA file written


def train_and_sample(model: torch.nn.Module, row: Row, work: str, probe: Probe,
                     config: Optional[TrainConfig] = None) -> RunResult:
    """Train ``row`` on ``model`` in place and sample it at its last step, adapters active
    (``render_preview`` is the engine's hook for rendering with the adapter in place)."""
    instance_dir = os.path.join(work, "instance")
    class_dir = os.path.join(work, "class")
    config = config or row.config(instance_dir, class_dir, name=_file_stem(row.label))
    config = dataclasses.replace(config, preview_every=config.steps)
    taken: list[Samples] = []

    def sample_now(step: int) -> Image.Image:
        taken.append(draw_samples(model, probe))
        return _pil(taken[-1].fidelity[0])

    result = train_lora(model, config, os.path.join(work, "loras"), os.path.join(work, "runs", config.output_name),
                        TrainCallbacks(render_preview=sample_now))
    if not taken or result.path is None:
        raise RuntimeError(f"{row.label}: the run ended before its last step")
    return RunResult(taken[-1], result.path)


def _file_stem(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


# --- a written file, applied as A1111 applies it --------------------------------------------

def _a1111_delta():
    """``tests/a1111_lora.a1111_delta``: the stand-in of A1111's Lora extension that
    ``tests/test_export.py`` proves against the golden tables of the real loader."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from a1111_lora import a1111_delta
    return a1111_delta


@contextlib.contextmanager
def applied_like_a1111(model: torch.nn.Module, path: str, multiplier: float) -> Iterator[None]:
    """``model`` with the LoRA file at ``path`` merged into its weights the way A1111's Lora
    extension merges it at ``<lora:name:multiplier>`` (and its bundled embedding substituted
    for the trigger, as A1111's textual-inversion hook does), put back afterwards."""
    a1111_delta = _a1111_delta()
    tensors = load_file(path)
    backups = {}
    pivot = None
    try:
        with torch.no_grad():
            for target in find_targets(model, "locon", train_text_encoder=True):
                prefix = target.kohya_name + "."
                weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if not weights:
                    continue
                module = model.get_submodule(target.path)
                backups[target.path] = module.weight.detach().clone()
                delta = a1111_delta(weights, module.weight, multiplier)
                module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
        if not backups:
            raise ValueError(f"{path}: no layer of the model matches the file's keys")
        bundled = {k: v for k, v in tensors.items() if k.startswith("bundle_emb.")}
        if bundled:
            pivot = install_pivot(model, TRIGGER, CLASS)
            load_vectors(pivot, bundled)
        yield
    finally:
        if pivot is not None:
            pivot.remove()
        with torch.no_grad():
            for module_path, weight in backups.items():
                model.get_submodule(module_path).weight.copy_(weight)
