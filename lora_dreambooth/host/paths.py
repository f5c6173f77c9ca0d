"""Where things go: runs and uploads under the output folder setting, LoRAs in ``--lora-dir``.

    <output>/datasets/instance, <output>/datasets/class   the tab's workspace
    <output>/queue/queue.json, <output>/queue/<job>/      the run queue, each job's copy of its
                                                          images and its run.json (job_queue)
    <output>/<name>-<YYYYmmdd-HHMMSS>/                    one run: previews, loss.csv, config.json,
                                                          optimizer.safetensors and the
                                                          intermediate <name>-stepNNNNN.safetensors
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from modules import paths_internal, shared

from .. import run_files
from ..config import TrainConfig
from ..export import unique_name
from . import settings


def output_root() -> str:
    folder = os.path.expanduser(str(settings.get(settings.OUTPUT_DIR)).strip() or "outputs/lora-train")
    return folder if os.path.isabs(folder) else os.path.join(paths_internal.data_path, folder)


def lora_dir() -> str:
    """The built-in Lora extension's folder (``--lora-dir``, default ``<models>/Lora``)."""
    folder = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths_internal.models_path, "Lora")
    os.makedirs(folder, exist_ok=True)
    return folder


def lora_files() -> dict[str, str]:
    """name → path of every ``*.safetensors`` under the Lora folder (subfolders too, as
    A1111 lists them; the first of two equal names wins)."""
    found: dict[str, str] = {}
    for folder, subfolders, names in sorted(os.walk(lora_dir()), key=lambda entry: entry[0]):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() == ".safetensors" and not name.startswith("."):
                found.setdefault(stem, os.path.join(folder, name))
    return found


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it once links and ``..`` are resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # Windows: another drive
        return False


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


def new_run_dir(config: TrainConfig) -> str:
    """``<output>/<name>-<stamp>`` (not created: the engine creates it), named as the LoRA
    file will be (``name-1`` when ``name`` is taken and overwriting is off), so the two match."""
    return run_files.new_run_dir(output_root(), unique_name(lora_dir(), config.output_name, config.overwrite))


#: What the engine names a run's intermediate saves (``train.py``: ``<name>-step{step:05d}``).
_INTERMEDIATE = re.compile(r".+-step(\d{5,})\.safetensors")


def intermediates(run_dir: Optional[str]) -> list[str]:
    """File names of the intermediate saves in ``run_dir``, in step order."""
    if not run_dir or not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _INTERMEDIATE.fullmatch(name))]
    return [name for _step, name in sorted(found)]


def last_run_dir(known: Optional[str]) -> Optional[str]:
    """The last run's folder: ``known`` (this session's last run), else, after a restart, the
    newest run folder under the output root that holds intermediate saves."""
    if known and os.path.isdir(known):
        return known
    root = output_root()
    if not os.path.isdir(root):
        return None
    folders = [entry.path for entry in os.scandir(root) if entry.is_dir() and intermediates(entry.path)]
    return max(folders, key=os.path.getmtime, default=None)


def intermediate_path(file: str, known_run_dir: Optional[str]) -> str:
    """The intermediate save ``file`` names: a file name in the last run's folder, or a path
    under the output root. Raises ValueError saying what is wrong; never resolves outside
    those folders, nor to anything but a ``<name>-stepNNNNN.safetensors`` (not, say, the run's
    ``optimizer.safetensors``)."""
    file = (file or "").strip()
    if not file:
        raise ValueError("no intermediate save chosen: pick one of the last run's <name>-stepNNNNN.safetensors")
    if os.path.basename(file) == file:
        folder = last_run_dir(known_run_dir)
        if folder is None:
            raise ValueError("no run folder with intermediate saves yet (set 'Save every N steps' and train)")
        path = os.path.join(folder, file)
    else:
        folder, path = output_root(), os.path.abspath(os.path.expanduser(file))
    if not inside(path, folder):
        raise ValueError(f"'{file}' is outside {folder}")
    if not _INTERMEDIATE.fullmatch(os.path.basename(path)):
        raise ValueError(f"'{file}' is not an intermediate save (<name>-stepNNNNN.safetensors)")
    if not os.path.isfile(path):
        raise ValueError(f"no intermediate save '{os.path.basename(path)}' in {os.path.dirname(path)}")
    return path
