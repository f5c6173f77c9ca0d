"""The callbacks scripts/lora_train.py registers with A1111, around one shared job."""
from __future__ import annotations

from modules import shared

from . import api, settings, ui
from .job import TrainingJob
from .runner import QueueRunner

JOB = TrainingJob()
RUNNER = QueueRunner(JOB)


def on_ui_tabs():
    return ui.create_tab(RUNNER)


def on_ui_settings() -> None:
    settings.register()


def on_app_started(_demo, app) -> None:
    api.register(app, RUNNER, getattr(shared.cmd_opts, "api_auth", None))
