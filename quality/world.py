"""The world: small pictures of one coloured shape on a plain pastel background, and their
captions ("a red circle"). The DreamBooth subject is the demo's character
(``lora_dreambooth.demo.draw_character``: an orange disc with two eyes), which the world never
draws: its circles, orange ones included, have no eyes.

Shapes and the character share size and position jitter and the background palette, so
telling the character from an orange circle comes down to the eyes, as it should. Decoys
(orange discs with the wrong marks: one eye, three, a bar, eyes too low, random dots) are drawn
for the judge alone, so that "the character" means two eyes in place, not any dark mark.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from lora_dreambooth.demo import draw_character

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "orange": (240, 120, 20),  # the character's orange
    "purple": (130, 40, 170),
}
COLOUR_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class Thing:
    """What a picture shows: a shape in a colour, the character, or a decoy of it."""

    shape: str
    colour: str
    character: bool = False
    decoy: bool = False

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


CHARACTER = Thing("circle", "orange", character=True)
DECOY = Thing("circle", "orange", decoy=True)  # the character's disc with the wrong marks
ALL_THINGS = tuple(Thing(s, c) for s in SHAPES for c in COLOUR_NAMES)


def _polygon(cx: float, cy: float, r: float, corners: int, rotation: float, inner: float = 1.0) -> list:
    """Corners of a regular polygon (``inner`` < 1: a star alternating outer and inner radius)."""
    points = []
    count = corners * (2 if inner < 1 else 1)
    for i in range(count):
        radius = r if i % 2 == 0 or inner >= 1 else r * inner
        angle = rotation + 2 * math.pi * i / count
        points.append((cx + radius * math.sin(angle), cy - radius * math.cos(angle)))
    return points


def _placed(seed: int, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw, np.random.Generator,
                                            tuple[float, float, float]]:
    """A pastel background and a jittered centre and radius, drawn from ``seed`` in
    ``draw_character``'s order; the generator is returned for what the picture draws next."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(150, 255, 3)))
    r = size * rng.uniform(0.25, 0.35)
    cx, cy = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
    return image, ImageDraw.Draw(image), rng, (cx, cy, r)


def draw(thing: Thing, seed: int, size: int = SIZE) -> Image.Image:
    """One picture of ``thing``; the same seed gives the same picture. Backgrounds, sizes and
    positions are drawn like ``draw_character``'s."""
    if thing.character:
        return draw_character(seed, size)
    if thing.decoy:
        return draw_decoy(seed, size)
    image, canvas, rng, (cx, cy, r) = _placed(seed, size)
    fill = COLOURS[thing.colour]
    if thing.shape == "circle":
        canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif thing.shape == "square":
        h = r * 0.85
        canvas.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif thing.shape == "triangle":
        canvas.polygon(_polygon(cx, cy + r * 0.15, r * 1.1, 3, 0.0), fill=fill)
    elif thing.shape == "star":
        canvas.polygon(_polygon(cx, cy, r * 1.15, 5, 0.0, inner=0.45), fill=fill)
    else:
        raise ValueError(f"unknown shape {thing.shape!r}")
    return image


def draw_decoy(seed: int, size: int = SIZE) -> Image.Image:
    """The character's disc with marks that are not its two eyes; ``seed % 5`` picks one eye,
    three eyes, both eyes smeared into a bar, both eyes too low, or 3-6 random dark dots."""
    image, canvas, rng, (cx, cy, r) = _placed(seed, size)
    canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS["orange"])

    def dot(x: float, y: float, radius: float = 3) -> None:
        canvas.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(0, 0, 0))

    eye_y, kind = cy - r / 4, seed % 5
    if kind == 0:
        dot(cx + (r / 3 if rng.random() < 0.5 else -r / 3), eye_y)
    elif kind == 1:
        for k in (-1, 0, 1):
            dot(cx + k * r / 2.5, eye_y)
    elif kind == 2:
        canvas.ellipse((cx - r / 3 - 3, eye_y - 3, cx + r / 3 + 3, eye_y + 3), fill=(0, 0, 0))
    elif kind == 3:
        for dx in (-r / 3, r / 3):
            dot(cx + dx, cy + r / 3)
    else:
        for _ in range(int(rng.integers(3, 7))):
            angle, distance = rng.uniform(0, 2 * math.pi), rng.uniform(0, r - 4)
            dot(cx + distance * math.cos(angle), cy + distance * math.sin(angle), rng.uniform(2, 4))
    return image


def render(things: list[Thing], seeds: list[int]) -> torch.Tensor:
    """``draw(things[i], seeds[i])`` for every i, as one uint8 NCHW tensor."""
    pictures = np.stack([np.asarray(draw(thing, seed)) for thing, seed in zip(things, seeds)])
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous()


def caption_variants(thing: Thing) -> tuple[str, ...]:
    """The ways the world's captions name ``thing``: with and without the article and colour."""
    return (f"a {thing.colour} {thing.shape}", f"{thing.colour} {thing.shape}",
            f"a {thing.shape}", thing.shape)


def sample_caption(thing: Thing, rng: np.random.Generator, drop: float = 0.1) -> str:
    """A training caption: empty with probability ``drop`` (for classifier-free guidance),
    else the full caption 60% of the time and each shorter variant otherwise."""
    if rng.random() < drop:
        return ""
    variants = caption_variants(thing)
    return variants[0] if rng.random() < 0.6 else variants[int(rng.integers(1, len(variants)))]
