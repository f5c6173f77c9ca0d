"""The "LoRA Train" section of A1111's Settings tab, and reading its values."""
from __future__ import annotations

from typing import Any

import gradio as gr
from modules import shared

from ..config import PRESETS

SECTION = ("lora_train", "LoRA Train")
OUTPUT_DIR = "lora_train_output_dir"
DEFAULT_PRESET = "lora_train_default_preset"
KEEP_DATASETS = "lora_train_keep_datasets"

_DEFAULTS: dict[str, Any] = {
    OUTPUT_DIR: "outputs/lora-train",
    DEFAULT_PRESET: "Dedicated",
    KEEP_DATASETS: True,
}


def register() -> None:
    """on_ui_settings callback."""
    shared.opts.add_option(OUTPUT_DIR, shared.OptionInfo(
        _DEFAULTS[OUTPUT_DIR],
        "Folder for training runs, previews and uploaded datasets (relative paths are inside "
        "the webui data folder)", section=SECTION))
    shared.opts.add_option(DEFAULT_PRESET, shared.OptionInfo(
        _DEFAULTS[DEFAULT_PRESET], "Preset the LoRA Train tab starts with", gr.Dropdown,
        {"choices": list(PRESETS)}, section=SECTION))
    shared.opts.add_option(KEEP_DATASETS, shared.OptionInfo(
        _DEFAULTS[KEEP_DATASETS], "Keep uploaded instance and class images after a run",
        section=SECTION))


def get(key: str) -> Any:
    """The current value; the default before the section is registered (A1111 builds tabs and
    settings in an order extensions should not rely on)."""
    return getattr(shared.opts, key, _DEFAULTS[key])
