"""The contamination grid inside A1111: every cell is A1111's txt2img, the LoRA applied by its
own Lora extension through ``<lora:name:w>``, so the grid shows what users will get.

A1111 leaves the last LoRA merged in the weights after a generation (and restores them on the
next one without it); the grid restores them itself at the end, through the extension's own
backups, so the model is back to its base weights whatever happened. The caller holds A1111's
queue lock (``wrap_gradio_gpu_call`` in the tab, ``call_queue.queue_lock`` in the API).

Grids are saved in the LoRA's run folder when it is the last run's LoRA, else in
``<output>/grids/``."""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Optional

from PIL import Image
from modules import shared

from ..export import atomic_write
from ..grid import Grid, GridRequest, render_grid
from . import a1111, files, paths, render
from .job import JobStatus

GRIDS_FOLDER = "grids"
NO_LORA_EXTENSION = ("A1111's built-in Lora extension is disabled (Extensions tab): the grid "
                     "cannot apply a LoRA without it.")


@dataclass
class GridOutcome:
    grid: Optional[Grid]
    path: Optional[str]
    message: str


def available_loras() -> list[str]:
    return sorted(paths.lora_files(), key=str.lower)


def lora_file(name: str) -> Optional[str]:
    return paths.lora_files().get(name)


def activation_text(name: str) -> str:
    """The trigger A1111 stores in the LoRA's sidecar (``<name>.json``), or ""."""
    path = lora_file(name)
    if path is None:
        return ""
    try:
        with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as f:
            text = json.load(f).get("activation text", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return text.strip() if isinstance(text, str) else ""


def request_problems(request: GridRequest) -> list[str]:
    problems = request.problems()
    if isinstance(request.lora, str) and request.lora.strip() and lora_file(request.lora) is None:
        problems.append(f"no LoRA named '{request.lora}' in {paths.lora_dir()}")
    if shared.sd_model is None:
        problems.append(a1111.NO_MODEL)
    elif a1111.lora_extension() is None:
        problems.append(NO_LORA_EXTENSION)
    return problems


def output_folder(lora_path: str, last_run: JobStatus) -> str:
    run_dir = last_run.run_dir
    if last_run.output and run_dir and os.path.isdir(run_dir) and os.path.isfile(last_run.output) \
            and os.path.samefile(last_run.output, lora_path):
        return run_dir
    return os.path.join(paths.output_root(), GRIDS_FOLDER)


def run(request: GridRequest, last_run: JobStatus) -> GridOutcome:
    """Render, restore the model, save the labelled grid. ``request`` has no problems."""
    model = shared.sd_model
    state = shared.state
    size = dict(seed=request.seed, steps=request.steps, cfg_scale=request.cfg_scale,
                width=request.resolution, height=request.resolution)

    def on_cell(index: int, total: int, prompt: str, weight: Optional[float]) -> None:
        state.job_count, state.job_no = total, index
        lora = f"{request.lora} at {weight:g}" if weight is not None else "no LoRA"
        state.textinfo = f"Grid {index + 1}/{total}: '{prompt or '(empty prompt)'}', {lora}"

    def render_cell(prompt: str, weight: Optional[float]) -> Optional[Image.Image]:
        if weight is None:
            image = render.txt2img(prompt, request.negative_prompt, **size)
        else:
            image = render.txt2img_with_lora(prompt, request.negative_prompt, request.lora, weight, **size)
        if image is not None:
            state.assign_current_image(image)
        return image

    try:
        grid = render_grid(request, render_cell, on_cell)
    finally:
        a1111.deactivate_networks(model)
    if grid is None:
        return GridOutcome(None, None, "Interrupted: no grid was saved.")
    folder = output_folder(lora_file(request.lora), last_run)
    os.makedirs(folder, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = files.free_path(folder, files.sanitise_name(f"grid-{request.lora}-seed{request.seed}-{stamp}.png"))
    atomic_write(path, lambda tmp: grid.image.save(tmp, format="PNG"))
    return GridOutcome(grid, path, f"Saved {path}")
