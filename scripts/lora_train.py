"""A1111 loads this file at start: register the LoRA Train tab, its settings and its API."""
from modules import script_callbacks

from lora_dreambooth.host import entry

script_callbacks.on_ui_tabs(entry.on_ui_tabs)
script_callbacks.on_ui_settings(entry.on_ui_settings)
script_callbacks.on_app_started(entry.on_app_started)
