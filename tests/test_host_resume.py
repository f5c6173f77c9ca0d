"""Going on from a run inside the stand-in A1111: intermediate saves listed and promoted into the
Lora folder, a LoRA of the Lora folder resumed through the tab (steps count on, the optimizer
state its run left is found), a resume with other settings refused with the engine's words and
nothing written, pivotal tuning from the tab, and the same through /lora-train/v1/*."""
from __future__ import annotations

import base64
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from a1111_stub.harness import (Event, a1111, after_run, api_client, field_overrides,  # noqa: F401
                                load_model_as_a1111, load_script, png_bytes, start_run, wait_until_finished,
                                write_images)

#: Tiny runs: 64 px, rank 4, no previews.
TINY = dict(trigger="sks", steps=3, batch_size=1, gradient_accumulation=1, rank=4, alpha=4.0, resolution=64,
            preview_every=0, learning_rate=1e-3, regularization=0.0)


@pytest.fixture
def tab(a1111, tiny_sd1):
    load_script()
    a1111.script_callbacks.ui_settings_callback()
    [(blocks, _title, _id)] = a1111.script_callbacks.ui_tabs_callback()
    from lora_dreambooth.host import entry, paths
    load_model_as_a1111(a1111.shared, tiny_sd1)
    ws = paths.workspace()
    write_images(ws.instance_dir, 2)
    return SimpleNamespace(blocks=blocks, job=entry.JOB, ws=ws, runs=paths.output_root())


def start(tab, task: str = "task(run)", **values) -> dict:
    return start_run(tab.blocks, field_overrides(**{**TINY, **values}), task)


def metadata(path: str) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def keys(path: str) -> list[str]:
    with safe_open(path, "pt") as f:
        return list(f.keys())


def listing(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_intermediate_saves_are_promoted_and_a_lora_resumes_with_its_optimizer_state(a1111, tab):
    first = start(tab, save_every=2)
    run_dir = tab.job.status().run_dir
    assert "class='error'" not in first["lora_train_error"]
    assert "sks-step00002.safetensors" in listing(run_dir) and "optimizer.safetensors" in listing(run_dir)
    listed = after_run(tab.blocks, "lora_train_intermediates")["lora_train_intermediates"]
    assert (listed["choices"], listed["value"]) == (["sks-step00002.safetensors"], None)
    listed = after_run(tab.blocks, "lora_train_resume_from")["lora_train_resume_from"]
    assert listed["choices"] == ["none", "sks"] and listed["value"] == "none"

    promote = Event(tab.blocks, "lora_train_promote")
    nothing = promote(overrides={"lora_train_intermediates": None})
    assert "Pick an intermediate save first" in nothing["lora_train_error"]
    bad_name = promote(overrides={"lora_train_intermediates": "sks-step00002.safetensors",
                                  "lora_train_promote_name": "../x"})
    assert "LoRA name must not contain path characters" in bad_name["lora_train_error"]
    not_a_save = promote(overrides={"lora_train_intermediates": "optimizer.safetensors"})
    assert "is not an intermediate save" in not_a_save["lora_train_error"]
    assert listing(a1111.lora_dir) == ["sks.json", "sks.safetensors"]

    promoted = promote(overrides={"lora_train_intermediates": "sks-step00002.safetensors"})
    assert promoted["lora_train_error"] == ""
    assert "&lt;lora:sks-step00002:1&gt;" in promoted["lora_train_promote_output"]
    path = os.path.join(a1111.lora_dir, "sks-step00002.safetensors")
    assert metadata(path)["ss_output_name"] == "sks-step00002" and metadata(path)["ss_steps"] == "2"
    assert "sks-step00002" in a1111.networks.available_networks  # A1111's Lora list was rescanned
    assert promoted["lora_train_resume_from"]["choices"] == ["none", "sks", "sks-step00002"]
    assert promoted["lora_train_grid_lora"]["choices"] == ["sks", "sks-step00002"]
    again = promote(overrides={"lora_train_intermediates": "sks-step00002.safetensors"})
    assert "&lt;lora:sks-step00002-1:1&gt;" in again["lora_train_promote_output"]
    replaced = promote(overrides={"lora_train_intermediates": "sks-step00002.safetensors",
                                  "lora_train_overwrite": True, "lora_train_promote_name": "sks-early"})
    assert "&lt;lora:sks-early:1&gt;" in replaced["lora_train_promote_output"]

    tab.job.reset()  # as after a restart: the newest run folder with intermediate saves is listed
    refreshed = Event(tab.blocks, "lora_train_intermediates_refresh")(
        overrides={"lora_train_intermediates": "sks-step00002.safetensors"})["lora_train_intermediates"]
    assert (refreshed["choices"], refreshed["value"]) == (["sks-step00002.safetensors"], "sks-step00002.safetensors")

    # The final file's optimizer state is in its run folder; an intermediate has none.
    choose = Event(tab.blocks, "lora_train_resume_from", "change")
    chosen = choose(overrides={"lora_train_resume_from": "sks"})
    state = os.path.join(run_dir, "optimizer.safetensors")
    assert chosen["lora_train_resume_optimizer"] == state
    info = chosen["lora_train_resume_info"]
    for expected in ("3 steps", "network type LoRA", "rank 4", "alpha 4", "text encoder not trained",
                     "no pivotal tuning", "trigger &#x27;sks&#x27;", "Optimizer state found"):
        assert expected in info, (expected, info)
    early = choose(overrides={"lora_train_resume_from": "sks-step00002"})
    assert early["lora_train_resume_optimizer"] == "" and "starts afresh" in early["lora_train_resume_info"]
    assert choose(overrides={"lora_train_resume_from": "none"}) == {"lora_train_resume_info": "",
                                                                   "lora_train_resume_optimizer": ""}

    progress = []
    real_progress = tab.job._on_progress
    tab.job._on_progress = lambda p, bridge: (progress.append((p.step, p.total)), real_progress(p, bridge))
    resumed = start(tab, "task(resume)", steps=2, resume_from="sks", resume_optimizer="ignored: looked up again")
    assert "class='error'" not in resumed["lora_train_error"]
    assert f"optimizer state of step 3 loaded from {state}" in resumed["lora_train_log"]
    assert "Finished 2 steps (5 in all, resumed from 3)" in resumed["lora_train_result"]
    assert resumed["lora_train_lora_prompt"] == "sks, <lora:sks-1:1>"
    assert metadata(os.path.join(a1111.lora_dir, "sks-1.safetensors"))["ss_steps"] == "5"
    assert [p for p in progress if p[0] > 3] == [(4, 5), (5, 5), (5, 5)]  # two steps, then saving
    status = tab.job.status()
    assert (status.step, status.total) == (5, 5)
    assert list(resumed["lora_train_loss"].data["step"]) == [4, 5]


def test_a_resume_with_other_settings_is_refused_with_what_to_change_and_nothing_is_written(a1111, tab):
    start(tab, steps=2)
    lora_files, runs = listing(a1111.lora_dir), listing(tab.runs)
    before = open(os.path.join(a1111.lora_dir, "sks.safetensors"), "rb").read()

    out = start(tab, "task(resume)", resume_from="sks", rank=8)

    assert "its rank is 4: set rank to 4" in out["lora_train_error"]
    assert tab.job.status().state == "failed"
    assert listing(a1111.lora_dir) == lora_files and listing(tab.runs) == runs  # no file, no run folder
    assert open(os.path.join(a1111.lora_dir, "sks.safetensors"), "rb").read() == before
    save_file({"x": torch.zeros(1)}, os.path.join(a1111.lora_dir, "foreign.safetensors"))
    listed = Event(tab.blocks, "lora_train_resume_refresh")(overrides={"lora_train_resume_from": "sks"})
    assert listed["lora_train_resume_from"]["choices"] == ["none", "foreign", "sks"]
    assert "3 steps" not in listed["lora_train_resume_info"] and "2 steps" in listed["lora_train_resume_info"]
    foreign = Event(tab.blocks, "lora_train_resume_from", "change")(overrides={"lora_train_resume_from": "foreign"})
    assert "records no step count" in foreign["lora_train_resume_info"]
    gone = start(tab, "task(gone)", resume_from="deleted")  # removed since the list was read
    assert "Nothing was started" in gone["lora_train_error"]
    assert "no LoRA named &#x27;deleted&#x27;" in gone["lora_train_error"]


def test_pivotal_tuning_from_the_tab_bundles_the_embedding(a1111, tab):
    out = start(tab, steps=2, pivotal=True, embedding_lr=1e-2, class_prompt="dog")
    assert "class='error'" not in out["lora_train_error"]
    path = os.path.join(a1111.lora_dir, "sks.safetensors")
    assert "bundle_emb.sks.string_to_param.*" in keys(path)
    info = Event(tab.blocks, "lora_train_resume_from", "change")(overrides={"lora_train_resume_from": "sks"})
    assert "pivotal tuning of &#x27;sks&#x27;" in info["lora_train_resume_info"]


# --- the API ---------------------------------------------------------------------------------

API = {key: TINY[key] for key in ("trigger", "rank", "alpha", "resolution", "preview_every", "learning_rate")}


@pytest.fixture
def client(a1111, tiny_sd1):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    return api_client(a1111)


def train(client, **values) -> dict:
    images = [base64.b64encode(png_bytes((200, 10, 10))).decode("ascii")]
    response = client.post("/lora-train/v1/train", json={**API, "instance_images": images, **values})
    assert response.status_code == 202, response.json()
    return wait_until_finished(client)


def test_api_resumes_by_name_and_promotes(a1111, client):
    from lora_dreambooth.host import entry, paths

    first = train(client, steps=2, save_every=1)
    assert first["state"] == "done", first
    first_run = entry.JOB.status().run_dir
    state = os.path.join(first_run, "optimizer.safetensors")

    promoted = client.post("/lora-train/v1/promote", json={"file": "sks-step00001.safetensors"})
    assert promoted.status_code == 200, promoted.json()
    assert promoted.json() == {"output": os.path.join(a1111.lora_dir, "sks-step00001.safetensors"),
                               "name": "sks-step00001"}
    assert "sks-step00001" in a1111.networks.available_networks

    resumed = train(client, steps=1, resume_from="sks")
    assert resumed["state"] == "done", resumed
    assert (resumed["step"], resumed["total"]) == (3, 3)
    assert metadata(resumed["output"])["ss_steps"] == "3"
    assert f"optimizer state of step 2 loaded from {state}" in entry.JOB.status().log

    # The last run kept no intermediate save; one of an earlier run is promoted by its path.
    earlier = os.path.join(first_run, "sks-step00001.safetensors")
    assert client.post("/lora-train/v1/promote", json={"file": "sks-step00001.safetensors"}).status_code == 422
    named = client.post("/lora-train/v1/promote", json={"file": earlier, "name": "sks-early", "overwrite": True})
    assert named.json()["name"] == "sks-early"
    assert metadata(named.json()["output"])["ss_output_name"] == "sks-early"

    outside = os.path.join(os.path.dirname(paths.output_root()), "elsewhere.safetensors")
    for payload, message in [
        ({"resume_from": "nowhere"}, "no LoRA named 'nowhere'"),
        ({"resume_from": outside}, "resume from must be in the Lora folder"),
        ({"resume_from": os.path.join(a1111.lora_dir, "gone.safetensors")}, "resume from: no such file"),
        ({"resume_from": "sks", "resume_optimizer": outside}, "resume optimizer must be in the Lora folder"),
        ({"resume_from": "sks-step00001", "resume_optimizer": state}, "is not the optimizer state of"),
        ({"resume_optimizer": state}, "resume optimizer needs 'resume from'"),
    ]:
        refused = client.post("/lora-train/v1/train", json={**API, "steps": 1, "instance_dir": "/nowhere", **payload})
        assert refused.status_code == 422 and any(message in d for d in refused.json()["detail"]), refused.json()
    for payload, message in [
        ({"file": ""}, "file must be"),
        ({"file": "optimizer.safetensors"}, "is not an intermediate save"),
        ({"file": "../../sks-step00001.safetensors"}, "is outside"),
        ({"file": outside}, "is outside"),
        ({"file": earlier, "name": "../x"}, "LoRA name must not contain path characters"),
        ({"file": earlier, "overwrite": "yes"}, "overwrite must be true or false"),
        ({"file": earlier, "colour": "red"}, "unknown field 'colour'"),
    ]:
        refused = client.post("/lora-train/v1/promote", json=payload)
        assert refused.status_code == 422 and any(message in d for d in refused.json()["detail"]), refused.json()

    from lora_dreambooth.config import TrainConfig
    assert entry.JOB.claim("busy", TrainConfig())  # a run is active
    assert client.post("/lora-train/v1/promote", json={"file": earlier}).status_code == 409
    entry.JOB.reset()


def test_promote_is_behind_api_auth(a1111):
    a1111.shared.cmd_opts.api_auth = "alice:secret"
    client = api_client(a1111)
    assert client.post("/lora-train/v1/promote", json={"file": "x"}).status_code == 401
    assert client.post("/lora-train/v1/promote", json={"file": "x"}, auth=("alice", "secret")).status_code == 422
