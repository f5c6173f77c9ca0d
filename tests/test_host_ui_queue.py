"""The tab's queue: *Add to queue* beside *Start*, the job list with each job's result, *Remove*,
*Copy as command*, and *Start* runs recorded in the same list."""
from __future__ import annotations

import json
import os
import shlex
import time
from types import SimpleNamespace

import pytest

from a1111_stub.harness import (QUICK, Event, Hold, a1111, field_overrides, load_model_as_a1111,  # noqa: F401
                                load_script, write_images, start_run)
from lora_dreambooth.config import TrainConfig


@pytest.fixture
def tab(a1111, tiny_sd1):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    load_script()
    a1111.script_callbacks.ui_settings_callback()
    [(blocks, _title, _id)] = a1111.script_callbacks.ui_tabs_callback()
    from lora_dreambooth.host import entry, paths
    return SimpleNamespace(blocks=blocks, runner=entry.RUNNER, ws=paths.workspace())


def add(tab, **values) -> dict:
    return Event(tab.blocks, "lora_train_queue_add")(overrides=field_overrides(**{**QUICK, "preview_every": 0, **values}))


def refresh(tab) -> dict:
    return Event(tab.blocks, "lora_train_queue_refresh")()


def choice(out: dict, name: str) -> str:
    return next(c for c in out["lora_train_queue_job"]["choices"] if f" · {name} · " in c)


def wait_done(tab, names: list[str], timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = refresh(tab)
        if all(any(f" · {n} · done" in c for c in out["lora_train_queue_job"]["choices"]) for n in names):
            return out
        time.sleep(0.05)
    raise AssertionError(refresh(tab))


def test_add_to_queue_remove_results_and_copy_as_command(a1111, tab, monkeypatch):
    write_images(tab.ws.instance_dir, 2)
    hold = Hold(monkeypatch)
    first = add(tab, name="first")
    assert "started" in first["lora_train_queue_message"] and hold.reached.wait(60)
    second = add(tab, name="second")
    assert "#1 in the queue" in second["lora_train_queue_message"]
    third = add(tab, name="third")
    assert "#2 in the queue" in third["lora_train_queue_message"]
    assert "<td>running</td>" in third["lora_train_queue"] and third["lora_train_queue"].count("<td>queued</td>") == 2
    for name in os.listdir(tab.ws.instance_dir):  # the user empties the dataset: queued jobs keep theirs
        os.remove(os.path.join(tab.ws.instance_dir, name))
    refused = add(tab, name="fourth")
    assert "no usable instance (dataset) images" in refused["lora_train_queue_message"]

    removed = Event(tab.blocks, "lora_train_queue_remove")(overrides={"lora_train_queue_job": choice(third, "second")})
    assert "removed" in removed["lora_train_queue_message"]
    assert not any(" · second · " in c for c in removed["lora_train_queue_job"]["choices"])
    nothing = Event(tab.blocks, "lora_train_queue_remove")(overrides={"lora_train_queue_job": None})
    assert "Choose a job first" in nothing["lora_train_queue_message"]

    hold.release()
    done = wait_done(tab, ["first", "third"])
    for name in ("first", "third"):
        output = os.path.join(a1111.lora_dir, f"{name}.safetensors")
        assert os.path.isfile(output) and output in done["lora_train_queue"]  # each job's result

    shown = Event(tab.blocks, "lora_train_queue_command")(overrides={"lora_train_queue_job": choice(done, "third")})
    command = shlex.split(shown["lora_train_queue_command_text"])
    assert command[:4] == ["python", "-m", "lora_dreambooth", "train"]
    run_json = command[command.index("--settings") + 1]
    with open(run_json, encoding="utf8") as f:
        config = TrainConfig.from_dict(json.load(f))
    assert config.name == "third" and len(os.listdir(config.instance_dir)) == 2
    assert config.instance_dir != tab.ws.instance_dir  # the job's own copy


def test_start_runs_now_and_is_listed_with_its_result(a1111, tab):
    write_images(tab.ws.instance_dir, 1)
    out = start_run(tab.blocks, field_overrides(**{**QUICK, "steps": 1, "preview_every": 0}), "task(t1)")
    assert "Finished 1 steps" in out["lora_train_result"]
    listed = tab.runner.jobs()
    assert [(job["source"], job["state"], job["output"]) for job in listed] == \
        [("tab start", "done", os.path.join(a1111.lora_dir, "sks.safetensors"))]
    assert "<td>done</td>" in refresh(tab)["lora_train_queue"]
