"""Captions and their tags: caption files, the instance prompt (trigger first) and kohya's
per-use tag shuffling and dropout.

A prompt's *tags* are its comma-separated parts. As in kohya's sd-scripts
(``shuffle_caption``, ``keep_tokens``, ``caption_tag_dropout_rate``), the first ``keep``
tags stay in place and are never dropped; the rest are shuffled and then each dropped with
probability ``dropout``. ``keep`` counts the trigger, which :func:`instance_prompt` puts
first: ``keep=1`` keeps just the trigger, ``keep=0`` lets it move and be dropped like any tag.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CAPTION_EXTENSION = ".txt"


def read_caption(path: str) -> str:
    """A caption file as one line: lines joined with ", ", whitespace collapsed."""
    try:
        with open(path, "r", encoding="utf-8-sig", errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    parts = [" ".join(line.split()) for line in text.splitlines()]
    return ", ".join(p.strip(" ,") for p in parts if p.strip(" ,"))


def instance_prompt(trigger: str, caption: str) -> str:
    """"<trigger>, <caption>"; the trigger alone without a caption; a caption that already
    starts with the trigger tag is used as it is."""
    trigger = trigger.strip()
    caption = caption.strip(" ,")
    if not caption:
        return trigger
    if caption.split(",")[0].strip() == trigger:
        return caption
    return f"{trigger}, {caption}"


def tags(prompt: str) -> list[str]:
    """The non-empty comma-separated tags of ``prompt``, stripped."""
    return [t.strip() for t in prompt.split(",") if t.strip()]


@dataclass(frozen=True)
class TagPolicy:
    """How a prompt changes each time it is used (kohya's caption options)."""

    shuffle: bool = False
    keep: int = 1
    dropout: float = 0.0

    def varies(self, prompt: str) -> bool:
        """Whether ``prompt`` can come out differently from one use to the next."""
        free = len(tags(prompt)) - self.keep
        return (self.shuffle and free >= 2) or (self.dropout > 0 and free >= 1)

    def apply(self, prompt: str, generator: torch.Generator) -> str:
        """One use of ``prompt``: the free tags shuffled, then each dropped with probability
        ``dropout``, joined with ", ". A prompt that cannot vary is returned as it is and
        draws nothing from ``generator``."""
        if not self.varies(prompt):
            return prompt
        parts = tags(prompt)
        fixed, free = parts[:self.keep], parts[self.keep:]
        if self.shuffle:
            free = [free[i] for i in torch.randperm(len(free), generator=generator).tolist()]
        if self.dropout > 0:
            draws = torch.rand(len(free), generator=generator, dtype=torch.float64).tolist()
            free = [tag for tag, u in zip(free, draws) if u >= self.dropout]
        return ", ".join(fixed + free)
