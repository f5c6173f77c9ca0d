"""The contamination grid's engine side: rows, validation, the "moved" number, the layout."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_dreambooth.grid import (HEADER_HEIGHT, LABEL_WIDTH, GridRequest, compose, lora_tag, moved_percent,
                                  render_grid)


def request(**changes) -> GridRequest:
    values = dict(lora="wpg", trigger="wpg", class_word="girl", seed=7, weights=[0.5, 1.0], resolution=64)
    return GridRequest(**{**values, **changes})


def test_rows_follow_the_lecture():
    rows = request(prompts=["{trigger} wear a hat, eating ramen", "{class} wear a hat, eating ramen", " "]).row_prompts()
    assert rows == ["wpg", "girl", "", "a photo of girl", "wpg wear a hat, eating ramen",
                    "girl wear a hat, eating ramen"]
    assert request().row_prompts()[4:] == ["wpg wear a hat, eating ramen", "girl wear a hat, eating ramen"]
    assert lora_tag("wpg", 1.0) == "<lora:wpg:1>" and lora_tag("a b", 0.25) == "<lora:a b:0.25>"


@pytest.mark.parametrize("changes, message", [
    (dict(trigger=" "), "trigger must not be empty"),
    (dict(class_word=""), "class word must not be empty"),
    (dict(trigger="a:b"), "trigger must not contain"),
    (dict(lora=""), "choose a LoRA"),
    (dict(lora="x>y"), "LoRA's name must not contain"),
    (dict(weights=[]), "weights must be"),
    (dict(weights=[0]), "weights must be"),
    (dict(weights=["1"]), "weights must be"),
    (dict(weights=[float("nan")]), "weights must be"),
    (dict(prompts=["<lora:other:1> hat"]), "must not name extra networks"),
    (dict(prompts="a hat"), "prompts must be a list"),
    (dict(prompts=["x"] * 9), "at most 8"),
    (dict(seed=-1), "seed must be a whole number"),
    (dict(steps=0), "steps must be"),
    (dict(cfg_scale=0.5), "CFG scale"),
    (dict(resolution=100), "resolution must be"),
])
def test_bad_requests_are_named(changes, message):
    problems = request(**changes).problems()
    assert any(message in p for p in problems), problems
    assert request().problems() == []


def test_moved_is_mean_absolute_pixel_change_in_percent():
    black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "white")
    assert moved_percent(black, black) == 0.0 and moved_percent(black, white) == 100.0
    half = Image.fromarray(np.full((8, 8, 3), 51, np.uint8))
    assert moved_percent(black, half) == pytest.approx(20.0)


def test_cells_are_rendered_no_lora_first_and_moved_uses_the_strongest_weight():
    calls = []

    def render(prompt, weight):
        calls.append((prompt, weight))
        value = 0 if weight is None else int(255 * abs(weight) / 2) if prompt else 0
        return Image.new("RGB", (64, 64), (value, value, value))

    seen = []
    grid = render_grid(request(prompts=[], weights=[1.0, -2.0]), render, lambda *args: seen.append(args))
    assert calls[:3] == [("wpg", None), ("wpg", 1.0), ("wpg", -2.0)] and len(calls) == 12
    assert [s[:2] for s in seen] == [(i, 12) for i in range(12)]
    assert [(row.prompt, row.moved) for row in grid.rows] == [
        ("wpg", 100.0), ("girl", 100.0), ("", 0.0), ("a photo of girl", 100.0)]
    assert grid.image.size == (LABEL_WIDTH + 3 * 64, HEADER_HEIGHT + 4 * 64)
    assert grid.cells[3][2].getpixel((0, 0)) == (255, 255, 255)


def test_an_interrupted_cell_gives_no_grid():
    images = iter([Image.new("RGB", (64, 64))] * 4)
    assert render_grid(request(), lambda prompt, weight: next(images, None)) is None


def test_layout_labels_left_and_on_top_cells_in_place():
    colours = [[(200, 0, 0), (0, 200, 0)], [(0, 0, 200), (200, 200, 0)]]
    cells = [[Image.new("RGB", (32, 48), c) for c in row] for row in colours]
    long = "a very long prompt that has to wrap over many lines " * 3
    image = compose(cells, [long + "\nmoved 12.5%", "ünïcode 中文\nmoved 0.0%"], ["no LoRA", "wpg @ 1"])
    assert image.size == (LABEL_WIDTH + 2 * 32, HEADER_HEIGHT + 2 * 48)
    pixels = np.asarray(image)
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            top, left = HEADER_HEIGHT + r * 48, LABEL_WIDTH + c * 32
            assert (pixels[top:top + 48, left:left + 32] == colour).all()
    assert (pixels[HEADER_HEIGHT:HEADER_HEIGHT + 48, :LABEL_WIDTH] < 128).any()   # row label drawn
    assert (pixels[:HEADER_HEIGHT, LABEL_WIDTH:LABEL_WIDTH + 32] < 128).any()     # column label drawn
    assert (pixels[:HEADER_HEIGHT, :LABEL_WIDTH] == 255).all()                    # corner left blank
