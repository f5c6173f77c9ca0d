"""Fixtures and helpers for the host tests (tests/test_host_*.py).

``a1111`` puts this stand-in folder on ``sys.path`` for one test, points A1111's data and Lora
folders at a temp dir, and afterwards removes the folder from ``sys.path`` and forgets every
module imported from it (and the host package, which holds references to them)."""
from __future__ import annotations

import importlib.util
import io
import os
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Optional

import pytest
import torch
from PIL import Image

STUB = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(STUB))
_STUB_MODULES = ("modules", "launch", "networks", "extra_networks_lora", "install", "lora_train_script")


def _forget_stub_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _STUB_MODULES or name.startswith("lora_dreambooth.host"):
            del sys.modules[name]


@pytest.fixture
def a1111(tmp_path):
    # One intra-op thread: the tiny model's ops are too small to gain from more, and on a
    # shared 2-core machine OpenMP oversubscription makes a 1 s run take a minute.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield enter_stand_in(str(tmp_path))
    finally:
        leave_stand_in()
        torch.set_num_threads(threads)


def enter_stand_in(folder: str) -> SimpleNamespace:
    """Put the stand-in on ``sys.path`` with A1111's data and Lora folders under ``folder``, the
    Lora extension's networks registered (also what bench/ runs the host in)."""
    sys.path.insert(0, STUB)
    _forget_stub_modules()
    from modules import (call_queue, devices, extra_networks, paths_internal, processing, progress,
                         script_callbacks, shared)
    import extra_networks_lora
    import networks

    extra_networks.initialize()  # what the Lora extension's before_ui callback does
    extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
    paths_internal.data_path = shared.data_path = os.path.join(folder, "webui")
    os.makedirs(paths_internal.data_path)  # A1111's data folder always exists
    paths_internal.models_path = shared.models_path = os.path.join(folder, "webui", "models")
    shared.cmd_opts.lora_dir = os.path.join(folder, "webui", "models", "Lora")
    return SimpleNamespace(shared=shared, state=shared.state, call_queue=call_queue, devices=devices,
                           processing=processing, progress=progress, script_callbacks=script_callbacks,
                           networks=networks, data_path=paths_internal.data_path,
                           lora_dir=shared.cmd_opts.lora_dir)


def leave_stand_in() -> None:
    sys.path.remove(STUB)
    _forget_stub_modules()


def load_model_as_a1111(shared, model: torch.nn.Module, model_hash: str = "0123abcdef",
                        checkpoint: str = "tiny.safetensors") -> torch.nn.Module:
    """The attributes A1111 sets on the model it loads from ``checkpoint`` (a file name in
    models/Stable-diffusion) whose sha256 starts with ``model_hash`` (the Lora extension names
    its layers), then ``shared.sd_model = model``."""
    import networks
    from modules import sd_models

    networks.assign_network_names_to_compvis_modules(model)
    model.lowvram = False
    info = sd_models.CheckpointInfo(os.path.join(sd_models.model_path(), checkpoint), model_hash.ljust(64, "0"))
    model.sd_model_hash = info.shorthash
    model.sd_model_checkpoint = info.filename
    model.sd_checkpoint_info = info
    shared.sd_model = model
    return model


def merge_like_a1111(module: torch.nn.Module, delta: torch.Tensor) -> None:
    """What A1111's Lora extension leaves behind after a generation with a LoRA: CPU backups
    of the base weights, the LoRA merged into the weights, its name recorded."""
    with torch.no_grad():
        module.network_weights_backup = module.weight.to("cpu", copy=True)
        module.network_bias_backup = None if module.bias is None else module.bias.to("cpu", copy=True)
        module.weight += delta
    module.network_current_names = (("some_lora", 1.0, 1.0, 1.0),)


def png_bytes(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: str, count: int, prefix: str = "img") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"{prefix}{i}.png")
        with open(path, "wb") as f:
            f.write(png_bytes((40 * i % 256, 90, 200 - 30 * i % 200)))
        paths.append(path)
    return paths


def load_script():
    """Import scripts/lora_train.py the way A1111 does (a file, not a package module)."""
    spec = importlib.util.spec_from_file_location("lora_train_script", os.path.join(ROOT, "scripts", "lora_train.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_train_script"] = module
    spec.loader.exec_module(module)
    return module


def component(blocks, elem_id: str):
    for block in blocks.blocks.values():
        if getattr(block, "elem_id", None) == elem_id:
            return block
    raise KeyError(elem_id)


class Event:
    """One wired gradio event of a built tab: call it the way gradio would."""

    def __init__(self, blocks, elem_id: str, trigger: str = "click"):
        target = component(blocks, elem_id)
        for index, dependency in enumerate(blocks.dependencies):
            if target._id in dependency["targets"] and dependency["trigger"] == trigger:
                self.fn = blocks.fns[index].fn
                self.inputs = [blocks.blocks[i] for i in dependency["inputs"]]
                self.outputs = [blocks.blocks[i] for i in dependency["outputs"]]
                self.js = dependency["js"]
                return
        raise KeyError(f"no {trigger} event on {elem_id}")

    def __call__(self, first: Any = None, overrides: Optional[dict] = None) -> dict:
        """Inputs are the components' current values, ``overrides`` by elem_id, and
        ``first`` (the task id the page's JS puts there) for the first input."""
        overrides = overrides or {}
        values = [overrides.get(c.elem_id, c.value) for c in self.inputs]
        if first is not None:
            values[0] = first
        result = self.fn(*values)
        result = result if isinstance(result, (tuple, list)) else (result,)
        return {c.elem_id: value for c, value in zip(self.outputs, result)}


def start_run(blocks, overrides: dict, task: str = "task(test1)") -> dict:
    """Start's two events as the page runs them: the check (its message at once), then the run
    (which trains only when the check let it go); the outputs of both, the run's where it
    changed something."""
    checked = Event(blocks, "lora_train_start")(overrides=overrides)
    ran = Event(blocks, "lora_train_start", "then")(task, {**overrides, **checked})
    return {**checked, **{key: value for key, value in ran.items() if not isinstance(value, dict)}}


def after_run(blocks, output: str, **overrides) -> dict:
    """The Start run's follow-up that updates ``output`` (the page runs it when the run ends;
    ``lora_train_ran`` is the run's job id, empty when Start was refused)."""
    start_id = component(blocks, "lora_train_start")._id
    for index, dependency in enumerate(blocks.dependencies):
        if dependency["trigger"] == "then" and start_id in dependency["targets"] \
                and component(blocks, output)._id in dependency["outputs"]:
            event = Event.__new__(Event)
            event.fn, event.js = blocks.fns[index].fn, dependency["js"]
            event.inputs = [blocks.blocks[i] for i in dependency["inputs"]]
            event.outputs = [blocks.blocks[i] for i in dependency["outputs"]]
            return event(overrides=overrides)
    raise KeyError(output)


def field_overrides(**values: Any) -> dict:
    return {f"lora_train_{key}": value for key, value in values.items()}


#: A quick run on the tiny model: 64 px, rank 4, previews every 2 steps with 2 sampler steps.
QUICK = dict(trigger="sks", steps=4, batch_size=1, gradient_accumulation=1, rank=4, alpha=4.0,
             resolution=64, preview_every=2, preview_steps=2, learning_rate=1e-3, regularization=0.0)


def api_client(a1111):
    """A FastAPI app with our routes registered as A1111 registers them (on_app_started)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    load_script()
    app = FastAPI()
    a1111.script_callbacks.app_started_callback(None, app)
    return TestClient(app)


def wait_until_finished(client, timeout: float = 60) -> dict:
    """Poll /status until the run is no longer "running"; its final status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get("/lora-train/v1/status").json()
        if status["state"] != "running":
            return status
        time.sleep(0.05)
    raise AssertionError("training did not finish")


def hook_progress(monkeypatch, hook: Callable[[Any], Any], at_start: Optional[Callable[[], Any]] = None) -> None:
    """Make the host job's ``train_lora`` call ``hook(progress)`` after the host's own callback
    has handled each progress report, and ``at_start()`` once before training (the host has
    then checked the model and taken its snapshot). It wraps the real
    ``lora_dreambooth.train.train_lora``, so a test may hook run after run."""
    from lora_dreambooth import train
    from lora_dreambooth.host import job

    real_train = train.train_lora

    def hooked_train(model, config, lora_dir, run_dir, callbacks, **kwargs):
        if at_start is not None:
            at_start()
        host_on_progress = callbacks.on_progress

        def on_progress(progress) -> None:
            host_on_progress(progress)
            hook(progress)
        callbacks.on_progress = on_progress
        return real_train(model, config, lora_dir, run_dir, callbacks, **kwargs)

    monkeypatch.setattr(job, "train_lora", hooked_train)


class Hold:
    """Holds the first run that reaches ``step`` until ``release()``; later runs go through."""

    def __init__(self, monkeypatch, step: int = 1):
        self.reached, self.gate, self.step, self.used = threading.Event(), threading.Event(), step, False
        self.order: list[str] = []  # the job of each progress report, in order
        hook_progress(monkeypatch, self.on_progress)

    def on_progress(self, progress) -> None:
        from lora_dreambooth.host import entry

        self.order.append(entry.JOB.status().job)
        if progress.step == self.step and not self.used:
            self.used = True
            self.reached.set()
            assert self.gate.wait(60)

    def release(self) -> None:
        self.gate.set()
