"""The trigger check against the model A1111 holds: how its tokenizer reads the trigger, the
lecture's rare tokens it has as single tokens, and "Show prior" (the bare trigger and the class
word rendered without any LoRA, so the user sees what the model already draws for them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from PIL import Image
from modules import shared

from .. import tokens
from . import a1111, render

UNKNOWN_TOKENIZER = ("The loaded model's text encoder is not one the token check knows (SD 1.x, "
                     "SD 2.x and SDXL are): use Show prior to see what the model makes of the trigger.")


@dataclass
class PriorRequest:
    trigger: str
    class_word: str
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    resolution: int


def check(text: str) -> tuple[Optional[tokens.TokenReport], Optional[str]]:
    """(report, None), or (None, why there is none: no model, unknown tokenizer)."""
    model = shared.sd_model
    if model is None:
        return None, a1111.NO_MODEL
    tokenize = tokens.model_tokenize(model)
    if tokenize is None:
        return None, UNKNOWN_TOKENIZER
    return tokens.check_trigger(tokenize, text or ""), None


def render_prior(request: PriorRequest) -> list[tuple[Image.Image, str]]:
    """(image, caption) for the trigger and the class word (each skipped when empty), stopping
    early if the user interrupts. The caller holds A1111's queue lock."""
    words = [w.strip() for w in (request.trigger, request.class_word) if w and w.strip()]
    shown = []
    state = shared.state
    state.job_count = len(words)
    for i, word in enumerate(words):
        state.job_no = i
        state.textinfo = f"Prior {i + 1}/{len(words)}: '{word}' without any LoRA"
        image = render.txt2img(word, request.negative_prompt, seed=request.seed, steps=request.steps,
                               cfg_scale=request.cfg_scale, width=request.resolution,
                               height=request.resolution)
        if image is None:
            break
        shown.append((image, f"{word} (seed {request.seed}, no LoRA)"))
    return shown
