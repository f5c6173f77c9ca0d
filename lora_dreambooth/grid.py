"""The contamination grid: what a LoRA does to prompts it was not meant to change.

The lecture reads every experiment the same way: render the trigger, the class word ("girl"),
the empty prompt and "a photo of girl" without and with the LoRA at one seed, plus prompts that
ask the concept to do something new ("wpg wear a hat, eating ramen"). A Dedicated model binds
the concept firmly but contaminates the class and even the empty prompt; a Generative model
(prior preservation) keeps them closer to the base model and the concept stays generative.

One row per prompt, one column per LoRA weight after a "no LoRA" column; each row gets one
number, how far the LoRA moved the picture: the mean absolute pixel difference between the
strongest-weight cell and the no-LoRA cell, as % of 255 (0 = untouched).

The renderer is a callback, so this module knows nothing of A1111 (the host renders each cell
with A1111's txt2img and ``<lora:name:w>``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_WEIGHTS = (0.5, 1.0)
#: Generativeness prompts from the lecture; ``{trigger}`` and ``{class}`` are filled in.
DEFAULT_PROMPTS = ("{trigger} wear a hat, eating ramen", "{class} wear a hat, eating ramen")
MAX_PROMPTS = 8
MAX_WEIGHTS = 4
LABEL_WIDTH = 200   # left column: the row's prompt and its "moved" number
HEADER_HEIGHT = 24  # top row: the column's weight
#: A1111's extra-network syntax (``<lora:name:1>``, ``<hypernet:…>``), with the spaces before it.
EXTRA_NETWORK = re.compile(r"\s*<\w+:[^>]+>")

#: (prompt, LoRA weight or None for no LoRA) → image, or None when the user interrupted.
RenderCell = Callable[[str, Optional[float]], Optional[Image.Image]]


@dataclass
class GridRequest:
    lora: str
    trigger: str
    class_word: str
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    seed: int = 1
    weights: list[float] = field(default_factory=lambda: list(DEFAULT_WEIGHTS))
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 5.0
    resolution: int = 512

    def problems(self) -> list[str]:
        """Everything wrong with the request, in words (the LoRA's existence is the host's)."""
        p: list[str] = []
        if not isinstance(self.lora, str) or not self.lora.strip():
            p.append("choose a LoRA")
        elif re.search(r"[<>:]", self.lora):
            p.append("the LoRA's name must not contain '<', '>' or ':' (A1111 could not name it in a prompt)")
        for label, text in (("trigger", self.trigger), ("class word", self.class_word)):
            if not isinstance(text, str) or not text.strip():
                p.append(f"{label} must not be empty (e.g. {'sks' if label == 'trigger' else 'woman'})")
            elif re.search(r"[<>:]", text):
                p.append(f"{label} must not contain '<', '>' or ':'")
        if not isinstance(self.prompts, list) or not all(isinstance(x, str) for x in self.prompts):
            p.append("prompts must be a list of strings")
        elif len(self.prompts) > MAX_PROMPTS:
            p.append(f"at most {MAX_PROMPTS} extra prompts")
        elif any(EXTRA_NETWORK.search(x) for x in self.prompts):
            p.append("prompts must not name extra networks (<lora:…>): the grid adds the LoRA itself")
        if not isinstance(self.weights, list) or not 1 <= len(self.weights) <= MAX_WEIGHTS or not all(
                _is_number(w) and math.isfinite(w) and w != 0 and abs(w) <= 4 for w in self.weights):
            p.append(f"weights must be 1 to {MAX_WEIGHTS} non-zero numbers between -4 and 4 (e.g. 0.5, 1)")
        _whole(p, "seed", self.seed, 0, 2 ** 32 - 1)
        _whole(p, "steps", self.steps, 1, 150)
        if not _is_number(self.cfg_scale) or not 1 <= self.cfg_scale <= 30:
            p.append("CFG scale must be between 1 and 30")
        if not isinstance(self.resolution, int) or self.resolution % 64 or not 64 <= self.resolution <= 2048:
            p.append("resolution must be a multiple of 64 between 64 and 2048")
        return p

    def row_prompts(self) -> list[str]:
        """trigger, class word, empty prompt, "a photo of <class>", then the extra prompts."""
        trigger, word = self.trigger.strip(), self.class_word.strip()
        extra = [x.replace("{trigger}", trigger).replace("{class}", word).strip() for x in self.prompts]
        return [trigger, word, "", f"a photo of {word}", *[x for x in extra if x]]

    @property
    def strongest(self) -> float:
        """The weight whose cell "moved" compares with no LoRA (1.0 by default)."""
        return max(self.weights, key=abs)


@dataclass
class GridRow:
    prompt: str
    moved: float  # % of 255


@dataclass
class Grid:
    image: Image.Image
    rows: list[GridRow]
    cells: list[list[Image.Image]]  # [row][column], column 0 without the LoRA


def lora_tag(name: str, weight: float) -> str:
    """A1111's extra-network syntax for one LoRA."""
    return f"<lora:{name}:{weight:g}>"


def moved_percent(base: Image.Image, other: Image.Image) -> float:
    a = np.asarray(base.convert("RGB"), dtype=np.float64)
    b = np.asarray(other.convert("RGB"), dtype=np.float64)
    return float(np.abs(a - b).mean() / 255 * 100)


def render_grid(request: GridRequest, render: RenderCell,
                on_cell: Optional[Callable[[int, int, str, Optional[float]], None]] = None) -> Optional[Grid]:
    """Render every cell (row by row, no LoRA first) and compose the labelled grid; None if a
    cell came back empty (interrupted). ``on_cell(index, total, prompt, weight)`` before each."""
    prompts = request.row_prompts()
    columns: list[Optional[float]] = [None, *request.weights]
    total = len(prompts) * len(columns)
    cells: list[list[Image.Image]] = []
    for r, prompt in enumerate(prompts):
        row = []
        for c, weight in enumerate(columns):
            if on_cell:
                on_cell(r * len(columns) + c, total, prompt, weight)
            image = render(prompt, weight)
            if image is None:
                return None
            row.append(image)
        cells.append(row)
    strongest = columns.index(request.strongest)
    rows = [GridRow(prompt, round(moved_percent(row[0], row[strongest]), 2)) for prompt, row in zip(prompts, cells)]
    labels = [f"{_shown(row.prompt)}\nmoved {row.moved:.1f}%" for row in rows]
    headers = ["no LoRA", *[f"{request.lora} @ {w:g}" for w in request.weights]]
    return Grid(compose(cells, labels, headers), rows, cells)


def compose(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
            column_labels: Sequence[str]) -> Image.Image:
    """Cells (all one size) under a header row of ``column_labels``, right of a column of
    ``row_labels``: ``LABEL_WIDTH + columns × width`` by ``HEADER_HEIGHT + rows × height``."""
    width, height = cells[0][0].size
    grid = Image.new("RGB", (LABEL_WIDTH + len(column_labels) * width, HEADER_HEIGHT + len(cells) * height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, label in enumerate(column_labels):
        _text(draw, font, label, (LABEL_WIDTH + c * width + 4, 4), width - 8, HEADER_HEIGHT - 4)
    for r, row in enumerate(cells):
        top = HEADER_HEIGHT + r * height
        _text(draw, font, row_labels[r], (4, top + 4), LABEL_WIDTH - 8, height - 8)
        for c, cell in enumerate(row):
            grid.paste(cell.convert("RGB"), (LABEL_WIDTH + c * width, top))
    return grid


def _shown(prompt: str) -> str:
    return prompt if prompt else "(empty prompt)"


def _text(draw: ImageDraw.ImageDraw, font, text: str, origin: tuple[int, int], max_width: int,
          max_height: int) -> None:
    """``text`` wrapped to ``max_width`` pixels. When it does not fit ``max_height`` the last
    line (a row's "moved" number) stays and the cut is marked with "...". Pillow's default
    bitmap font only has Latin-1: other characters are drawn as "?"."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    line_height = font.getbbox("Ag")[3] + 2
    lines = [wrapped for paragraph in text.split("\n") for wrapped in _wrap(draw, font, paragraph, max_width)]
    fit = max(1, max_height // line_height)
    if len(lines) > fit:
        kept = lines[:fit - 1]
        if kept:
            kept[-1] += "..."
        lines = kept + lines[-1:]
    for i, line in enumerate(lines):
        draw.text((origin[0], origin[1] + i * line_height), line, fill="black", font=font)


def _wrap(draw: ImageDraw.ImageDraw, font, text: str, max_width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(p: list[str], label: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        p.append(f"{label} must be a whole number between {low} and {high}")
