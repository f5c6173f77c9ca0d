"""Where things go: runs and uploads under the output folder setting, LoRAs in ``--lora-dir``.

    <output>/datasets/instance, <output>/datasets/class   the tab's workspace
    <output>/api-uploads/<job>/                           images posted to the API
    <output>/<name>-<YYYYmmdd-HHMMSS>/                    one run: previews, loss.csv, config.json
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from modules import paths_internal, shared

from . import settings


def output_root() -> str:
    folder = os.path.expanduser(str(settings.get(settings.OUTPUT_DIR)).strip() or "outputs/lora-train")
    return folder if os.path.isabs(folder) else os.path.join(paths_internal.data_path, folder)


def lora_dir() -> str:
    """The built-in Lora extension's folder (``--lora-dir``, default ``<models>/Lora``)."""
    folder = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths_internal.models_path, "Lora")
    os.makedirs(folder, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Workspace:
    """The tab's uploaded images (one dataset at a time, like the lecture's notebook)."""

    instance_dir: str
    class_dir: str

    def create(self) -> "Workspace":
        os.makedirs(self.instance_dir, exist_ok=True)
        os.makedirs(self.class_dir, exist_ok=True)
        return self


def workspace() -> Workspace:
    base = os.path.join(output_root(), "datasets")
    return Workspace(os.path.join(base, "instance"), os.path.join(base, "class")).create()


def _stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_run_dir(name: str) -> str:
    """``<output>/<name>-<stamp>`` (not created: the engine creates it), ``-2``… if taken."""
    base = os.path.join(output_root(), f"{name}-{_stamp()}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def upload_dir_name(job_id: str) -> str:
    return os.path.join(output_root(), "api-uploads", f"{_stamp()}-{job_id}")
