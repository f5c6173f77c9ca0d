"""'Generate N class images' with the loaded model, for prior preservation.

Generated files are listed in a small hidden manifest (``.lora-train-class.json``) with the
prompt and the model hash they came from: while both are unchanged they are reused and only the missing
ones are made; when either changes, the old generated files (and only those: uploaded class
images stay) are replaced."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from modules import shared

from ..export import atomic_write
from . import render

MANIFEST = ".lora-train-class.json"


@dataclass
class ClassRequest:
    prompt: str
    count: int
    negative_prompt: str
    resolution: int
    steps: int
    cfg_scale: float


def model_hash(model) -> str:
    return str(getattr(model, "sd_model_hash", None) or getattr(getattr(model, "sd_checkpoint_info", None), "shorthash", "") or "")


def read_manifest(folder: str) -> dict:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_manifest(folder: str, manifest: dict) -> None:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)

    atomic_write(os.path.join(folder, MANIFEST), write)


def generate(folder: str, request: ClassRequest, should_stop: Callable[[], bool],
             on_image: Callable[[int, int], None]) -> str:
    """Make ``request.count`` class images in ``folder`` (reusing what matches); a message."""
    prompt = render.strip_extra_networks(request.prompt)
    if not prompt:
        return "Enter a class prompt (e.g. 'woman') to generate class images."
    os.makedirs(folder, exist_ok=True)
    current = model_hash(shared.sd_model)
    manifest = read_manifest(folder)
    files = [f for f in manifest.get("files", []) if os.path.isfile(os.path.join(folder, f))]
    if manifest.get("prompt") != prompt or manifest.get("model_hash") != current:
        for name in files:
            os.remove(os.path.join(folder, name))
        files = []
    reused = min(len(files), request.count)
    manifest = {"prompt": prompt, "model_hash": current, "files": files}
    _write_manifest(folder, manifest)
    made = 0
    for i in range(request.count - len(files)):
        if should_stop():
            break
        on_image(i, request.count - reused)
        image = render.txt2img(prompt, request.negative_prompt, seed=-1, steps=request.steps,
                               cfg_scale=request.cfg_scale, width=request.resolution,
                               height=request.resolution)
        if image is None:
            break
        name = _next_name(folder)
        atomic_write(os.path.join(folder, name), lambda tmp: image.save(tmp, format="PNG"))
        manifest["files"].append(name)
        _write_manifest(folder, manifest)
        made += 1
    return (f"{made} class image{'s' if made != 1 else ''} generated, {reused} reused "
            f"('{prompt}', model {current or 'unknown'})")


def _next_name(folder: str) -> str:
    n = 1
    while os.path.exists(os.path.join(folder, f"class-{n:05d}.png")):
        n += 1
    return f"class-{n:05d}.png"
