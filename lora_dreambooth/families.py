"""What each model family trains best with before the user touches anything.

SD 1.x and 512-base SD 2.x were trained at 512 px, 768-v SD 2.x at 768 px and SDXL at 1024 px
with mixed aspect ratios (so buckets on). SDXL's two text encoders are large and rarely worth
training for a character: off, with a lower rank and checkpointing to fit common GPUs.
"""
from __future__ import annotations

from typing import Any

from .model import Backend

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sd2-v": "SD 2.x (768-v)", "sdxl": "SDXL"}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd1": {"resolution": 512, "rank": 32, "alpha": 32.0, "train_text_encoder": False, "buckets": False,
            "gradient_checkpointing": False},
    "sd2": {"resolution": 512, "rank": 32, "alpha": 32.0, "train_text_encoder": False, "buckets": False,
            "gradient_checkpointing": False},
    "sd2-v": {"resolution": 768, "rank": 32, "alpha": 32.0, "train_text_encoder": False, "buckets": False,
              "gradient_checkpointing": False},
    "sdxl": {"resolution": 1024, "rank": 16, "alpha": 16.0, "train_text_encoder": False, "buckets": True,
             "gradient_checkpointing": True},
}

#: The fields a family sets (the tab's "defaults for the loaded model" button fills these).
FAMILY_FIELDS = tuple(_DEFAULTS["sd1"])


def family_defaults(backend: Backend) -> dict[str, Any]:
    return dict(_DEFAULTS[backend.sd_version])


def family_label(backend: Backend) -> str:
    return FAMILY_LABELS[backend.sd_version]
