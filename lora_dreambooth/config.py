"""Every hyperparameter of a training run, checked in words a user understands.

The names are the API's field names (``POST /lora-train/v1/train``) and the tab's controls.
The lecture's vocabulary: a *step* is one optimizer update of ``batch_size ×
gradient_accumulation`` samples; *regularization* is the prior-preservation strength (0 =
off, the "Dedicated" approach; 0.1–1 with class images, the "Generative" one).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from . import networks

LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

#: The lecture's default preview negative prompt.
LECTURE_NEGATIVE_PROMPT = (
    "grain, pattern, disfigured, kitsch, ugly, oversaturated, grain, low-res, Deformed, blurry, "
    "bad anatomy, disfigured, poorly drawn face, mutation, mutated, extra limb, poorly drawn "
    "hands, missing limb, blurry, floating limbs, disconnected limbs, malformed hands, blur, out "
    "of focus, long neck, long body, disgusting, poorly drawn, childish, mutilated, mangled, old, "
    "surreal")

_NAME_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


class ConfigError(ValueError):
    """Raised with every problem of a config at once, one message per line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class TrainConfig:
    # What to learn
    trigger: str = "sks"
    name: str = ""  # LoRA file name; empty = the trigger
    instance_dir: str = ""
    class_dir: str = ""
    class_prompt: str = ""
    regularization: float = 0.0  # prior-preservation strength; 0 = off ("Dedicated")
    # How long and how hard
    steps: int = 200
    learning_rate: float = 1e-4
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 = no clipping
    # The adapter
    network: str = "lora"
    rank: int = 32
    alpha: float = 32.0
    conv_rank: int = 8  # convolution rank of the types that adapt convolutions (networks.conv_labels())
    conv_alpha: float = 8.0
    train_text_encoder: bool = False
    text_encoder_lr: float = 5e-5
    # Pivotal tuning: a new embedding for the trigger, trained with the adapter and bundled
    # in the LoRA file (one vector per token of the trigger; see embedding.py)
    pivotal: bool = False
    embedding_lr: float = 1e-3
    # Images
    resolution: int = 512
    buckets: bool = False
    augment: bool = False  # flip, small rotation, scale crops ("make one image four")
    flip: bool = False  # horizontal flip only (keeps the latent cache: both sides are cached)
    # Caption tags (kohya's shuffle_caption, keep_tokens, caption_tag_dropout_rate): the first
    # keep_tokens comma-separated tags (the trigger is the first) stay in place and are never
    # dropped; the others are shuffled / dropped anew each time a caption is used
    shuffle_tags: bool = False
    keep_tokens: int = 1
    tag_dropout: float = 0.0
    # Numerics
    seed: int = 1
    precision: str = "auto"
    gradient_checkpointing: bool = False
    min_snr_gamma: float = 0.0  # 0 = off
    noise_offset: float = 0.0
    # Previews and saves
    preview_prompt: str = ""  # empty = the trigger
    preview_negative_prompt: str = LECTURE_NEGATIVE_PROMPT
    preview_every: int = 0  # 0 = no previews
    preview_seed: int = 1
    preview_steps: int = 20
    preview_cfg: float = 5.0
    save_every: int = 0  # 0 = only the final file
    save_dtype: str = "fp16"
    save_optimizer: bool = True  # optimizer.safetensors in the run folder, for an exact resume
    overwrite: bool = False
    # Continue a LoRA this extension wrote (.safetensors); its run's optimizer state is found
    # beside it or given here (see resume.py)
    resume_from: str = ""
    resume_optimizer: str = ""
    comment: str = ""

    @property
    def output_name(self) -> str:
        return (self.name or self.trigger).strip()

    @property
    def effective_preview_prompt(self) -> str:
        return self.preview_prompt.strip() or self.trigger.strip()

    @property
    def prior_preservation(self) -> bool:
        return self.regularization > 0

    def problems(self) -> list[str]:
        """Every reason this config cannot train, in words for the user (empty if fine)."""
        p: list[str] = []
        trigger = self.trigger.strip()
        if not trigger:
            p.append("trigger must not be empty")
        elif re.search(r"[<>:]", trigger):
            p.append("trigger must not contain '<', '>' or ':' (they break <lora:...> prompts)")
        name = self.output_name  # empty only when the trigger is, which is reported above
        problem = name_problem(name) if name else ""
        if problem:
            p.append(problem)
        if self.pivotal and "." in trigger:
            p.append("with pivotal tuning the trigger must not contain '.' (A1111 reads a bundled "
                     "embedding's name up to the first dot)")
        _range(p, "steps", self.steps, 1, 100_000)
        _range(p, "learning rate", self.learning_rate, 1e-7, 1e-1)
        _range(p, "batch size", self.batch_size, 1, 64)
        _range(p, "gradient accumulation", self.gradient_accumulation, 1, 128)
        _range(p, "rank", self.rank, 1, 128)
        _range(p, "alpha", self.alpha, 1e-3, 1024)
        _range(p, "convolution rank", self.conv_rank, 1, 128)
        _range(p, "convolution alpha", self.conv_alpha, 1e-3, 1024)
        _range(p, "text encoder learning rate", self.text_encoder_lr, 1e-7, 1e-1)
        _range(p, "embedding learning rate", self.embedding_lr, 1e-7, 1)
        _range(p, "regularization strength", self.regularization, 0, 10)
        _range(p, "warmup steps", self.lr_warmup_steps, 0, max(self.steps, 0))
        _range(p, "weight decay", self.weight_decay, 0, 1)
        _range(p, "gradient clipping norm", self.max_grad_norm, 0, 1e4)
        _range(p, "min-SNR gamma", self.min_snr_gamma, 0, 100)
        _range(p, "noise offset", self.noise_offset, 0, 1)
        _range(p, "preview every", self.preview_every, 0, 100_000)
        _range(p, "preview steps", self.preview_steps, 1, 150)
        _range(p, "preview CFG scale", self.preview_cfg, 1, 30)
        _range(p, "save every", self.save_every, 0, 100_000)
        _range(p, "keep tokens (tags kept in place, the trigger first)", self.keep_tokens, 0, 100)
        _range(p, "tag dropout", self.tag_dropout, 0, 1)
        if not isinstance(self.resolution, int) or self.resolution % 64 or not 64 <= self.resolution <= 2048:
            p.append("resolution must be a multiple of 64 between 64 and 2048")
        _choice(p, "network type", self.network, networks.NAMES)
        _choice(p, "LR schedule", self.lr_schedule, LR_SCHEDULES)
        _choice(p, "optimizer", self.optimizer, OPTIMIZERS)
        _choice(p, "precision", self.precision, PRECISIONS)
        _choice(p, "save precision", self.save_dtype, ("fp16", "bf16", "fp32"))
        if self.regularization > 0 and not self.class_prompt.strip():
            p.append("class prompt is needed when regularization is above 0 (e.g. 'woman')")
        for label, path in (("resume from", self.resume_from), ("resume optimizer", self.resume_optimizer)):
            if path.strip() and not path.strip().lower().endswith(".safetensors"):
                p.append(f"{label} must be a .safetensors file (other formats are never unpickled)")
        if self.resume_optimizer.strip() and not self.resume_from.strip():
            p.append("resume optimizer needs 'resume from' (the LoRA file it belongs to)")
        return p

    def validate(self) -> "TrainConfig":
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from API/UI values; unknown keys are reported, types are coerced."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError([f"unknown setting '{k}'" for k in unknown])
        kwargs: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in values.items():
            default = getattr(cls(), key)
            try:
                kwargs[key] = _coerce(value, type(default))
            except (TypeError, ValueError):
                problems.append(f"{key} must be a {type(default).__name__}, got {value!r}")
        if problems:
            raise ConfigError(problems)
        return cls(**kwargs)


def name_problem(name: str) -> str:
    """Why ``name`` cannot be a LoRA file stem, or "" when it can."""
    if _NAME_FORBIDDEN.search(name) or name in (".", "..") or name != name.strip(". "):
        return ("LoRA name must not contain path characters (< > : \" / \\ | ? *) "
                "or start/end with a dot or space")
    if len(name) > 100:
        return "LoRA name must be at most 100 characters"
    return ""


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off", ""):
                return False
            raise ValueError(value)
        return bool(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def _range(problems: list[str], label: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not low <= value <= high:
        problems.append(f"{label} must be between {low:g} and {high:g}")


def _choice(problems: list[str], label: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{label} must be one of: {', '.join(allowed)}")


# --- The lecture's two approaches ------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # Regularization off, short, batch × LR ≈ 1e-3 (the lecture's experiment #A).
    "Dedicated": {"regularization": 0.0, "steps": 200, "batch_size": 2, "learning_rate": 5e-4,
                  "gradient_accumulation": 1, "rank": 32, "alpha": 32.0},
    # Prior preservation with class images, deeper training ("repair the damages").
    "Generative": {"regularization": 0.2, "steps": 400, "batch_size": 1, "learning_rate": 1e-4,
                   "gradient_accumulation": 1, "rank": 32, "alpha": 32.0},
}


def apply_preset(config: TrainConfig, preset: str) -> TrainConfig:
    if preset not in PRESETS:
        raise ConfigError([f"preset must be one of: {', '.join(PRESETS)}"])
    return dataclasses.replace(config, **PRESETS[preset])


@dataclass(frozen=True)
class EpochArithmetic:
    images: int
    samples_per_step: int
    samples_seen: int
    epochs: float

    def describe(self, batch_size: int, accumulation: int, steps: int, processes: int = 1) -> str:
        parallel = f" × {processes} processes" if processes > 1 else ""
        return (f"{self.images} images, batch {batch_size}, accumulation {accumulation}{parallel}, "
                f"{steps} steps → {self.samples_seen} samples, {self.epochs:g} epochs")


def epoch_arithmetic(images: int, batch_size: int, accumulation: int, steps: int,
                     processes: int = 1) -> EpochArithmetic:
    """The lecture's arithmetic: 5 images × 3 epochs = 15 samples = 8 steps at batch 2. A
    data-parallel run's step holds every process's batch: ``processes`` × batch × accumulation."""
    per_step = batch_size * accumulation * processes
    seen = per_step * steps
    epochs = round(seen / images, 2) if images else 0.0
    return EpochArithmetic(images, per_step, seen, epochs)
