"""The trigger check, "Show prior" and the contamination grid inside a stand-in A1111 whose
txt2img really applies ``<lora:name:w>`` (tests/a1111_stub/networks.py merges the file's deltas
as A1111 computes them and keeps A1111's backups)."""
from __future__ import annotations

import base64
import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from a1111_lora import a1111_delta
from a1111_stub.harness import (QUICK, Event, a1111, after_run, api_client, field_overrides,  # noqa: F401
                                load_model_as_a1111, load_script, start_run, write_images)
from lora_dreambooth.grid import HEADER_HEIGHT, LABEL_WIDTH
from lora_dreambooth.guard import state_hash
from lora_dreambooth.targets import find_targets

RENDER = {"lora_train_preview_steps": 2, "lora_train_resolution": 64, "lora_train_class_prompt": "woman"}


@pytest.fixture
def tab(a1111):
    load_script()
    a1111.script_callbacks.ui_settings_callback()
    [(blocks, _title, _id)] = a1111.script_callbacks.ui_tabs_callback()
    from lora_dreambooth.host import entry, paths
    return SimpleNamespace(blocks=blocks, job=entry.JOB, runner=entry.RUNNER, ws=paths.workspace())


@pytest.fixture
def client(a1111):
    return api_client(a1111)


def hand_made_lora(model, path: str, up_scale: float, rank: int = 2) -> None:
    """A kohya-named LoRA on every attention projection; lora_up all zeros when up_scale is 0."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for target in find_targets(model, "lora"):
        weight = model.get_submodule(target.path).weight
        down = torch.randn((rank, *weight.shape[1:]), generator=generator)
        up = torch.randn((weight.shape[0], rank, *[1] * (weight.dim() - 2)), generator=generator) * up_scale
        tensors.update({f"{target.kohya_name}.lora_down.weight": down, f"{target.kohya_name}.lora_up.weight": up,
                        f"{target.kohya_name}.alpha": torch.tensor(float(rank))})
    save_file(tensors, path)


def cell(grid: Image.Image, row: int, column: int, size: int = 64) -> np.ndarray:
    left, top = LABEL_WIDTH + column * size, HEADER_HEIGHT + row * size
    return np.asarray(grid.crop((left, top, left + size, top + size)))


def test_a1111_stand_in_merges_loras_like_a1111_and_restores_from_its_backups(a1111, tiny_sd1):
    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    hand_made_lora(model, os.path.join(a1111.lora_dir, "hand.safetensors"), up_scale=0.1)
    base = state_hash(model)
    target = find_targets(model, "lora")[0]
    layer = model.get_submodule(target.path)
    before = layer.weight.detach().clone()
    expected = a1111_delta({k.split(".", 1)[1]: v for k, v in load_file(os.path.join(a1111.lora_dir, "hand.safetensors")).items()
                            if k.startswith(target.kohya_name + ".")}, before, 0.5)

    from lora_dreambooth.host import render
    kwargs = dict(seed=1, steps=1, cfg_scale=5.0, width=64, height=64)
    render.txt2img_with_lora("sks", "", "hand", 0.5, **kwargs)
    assert torch.allclose(layer.weight, before + expected, atol=1e-6)  # A1111 leaves it merged…
    assert torch.equal(layer.network_weights_backup, before)          # …with a CPU backup
    render.txt2img("sks", "", **kwargs)                                # the next plain txt2img
    assert state_hash(model) == base and a1111.networks.loaded_networks == []


def test_trigger_check_follows_typing_and_fills_suggestions(a1111, tab, tiny_sd1):
    check = Event(tab.blocks, "lora_train_trigger", "change")
    assert check(overrides=field_overrides(trigger="wpg"))["lora_train_token_info"] == ""  # no model yet
    load_model_as_a1111(a1111.shared, tiny_sd1)
    out = check(overrides=field_overrides(trigger="wpg"))
    assert "split into 3 pieces" in out["lora_train_token_info"] and "<code>g&lt;/w&gt;</code>" in out["lora_train_token_info"]
    assert out["lora_train_token_suggestions"]["choices"] == ["shs"]  # verified in the tiny tokenizer
    assert "good trigger" in check(overrides=field_overrides(trigger="sks"))["lora_train_token_info"]
    assert "ordinary word" in check(overrides=field_overrides(trigger="woman"))["lora_train_token_info"]
    pick = Event(tab.blocks, "lora_train_token_suggestions", "change")
    assert pick(overrides={"lora_train_token_suggestions": "shs"})["lora_train_trigger"] == "shs"


def test_token_api(a1111, client, tiny_sd1):
    missing = client.get("/lora-train/v1/token", params={"text": "sks"})
    assert missing.status_code == 503 and "No Stable Diffusion model" in missing.json()["detail"][0]
    load_model_as_a1111(a1111.shared, tiny_sd1)
    body = client.get("/lora-train/v1/token", params={"text": "wpg"}).json()
    assert (body["pieces"], body["single_token"], body["ordinary_word"], body["suggestions"]) == (
        ["w", "p", "g</w>"], False, False, ["shs"])
    assert "3 pieces" in body["message"]
    assert client.get("/lora-train/v1/token").status_code == 422


def test_train_then_grid_shows_what_the_lora_moved_and_restores_the_model(a1111, tab, tiny_sd1, monkeypatch):
    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    base = state_hash(model)
    prior = Event(tab.blocks, "lora_train_show_prior")("task(prior)", {**RENDER, **field_overrides(trigger="sks")})
    assert [caption for _image, caption in prior["lora_train_prior"]] == ["sks (seed 1, no LoRA)",
                                                                          "woman (seed 1, no LoRA)"]
    write_images(tab.ws.instance_dir, 2)
    ran = start_run(tab.blocks, field_overrides(**{**QUICK, "learning_rate": 1e-2}), "task(run)")
    assert ran["lora_train_ran"] == tab.runner.jobs()[-1]["job"]  # the run's job, as the queue lists it
    offered = after_run(tab.blocks, "lora_train_grid", **RENDER, lora_train_ran=ran["lora_train_ran"])
    assert offered["lora_train_grid"]["open"] is True and offered["lora_train_grid_lora"]["value"] == "sks"
    assert offered["lora_train_grid_class"] == "woman"
    assert Event(tab.blocks, "lora_train_grid_lora", "change")(
        overrides={"lora_train_grid_lora": "sks"})["lora_train_grid_trigger"] == "sks"  # the card's activation text

    progress = []
    real_process_images = a1111.processing.process_images
    monkeypatch.setattr(a1111.processing, "process_images",
                        lambda p: progress.append((a1111.state.job_no, a1111.state.job_count, p.prompt))
                        or real_process_images(p))
    out = Event(tab.blocks, "lora_train_grid_render")("task(grid)", {
        **RENDER, "lora_train_grid_lora": "sks", "lora_train_grid_class": "woman", "lora_train_grid_seed": 1})

    assert "class='error'" not in out["lora_train_error"]
    grid = out["lora_train_grid_image"]
    assert grid.size == (LABEL_WIDTH + 3 * 64, HEADER_HEIGHT + 6 * 64)  # 6 rows: no LoRA, 0.5, 1
    assert [job_no for job_no, _, _ in progress] == list(range(18)) and {n for _, n, _ in progress} == {18}
    assert [prompt for _, _, prompt in progress[:3]] == ["sks", "sks <lora:sks:0.5>", "sks <lora:sks:1>"]
    assert progress[6][2] == "" and progress[8][2] == "<lora:sks:1>"  # the empty prompt, with and without
    assert a1111.processing.activated_networks.count("sks") == 12
    # the trained LoRA moves the trigger; the no-LoRA column is the base model (= Show prior)
    moved = out["lora_train_grid_rows"]
    assert "moved at weight 1" in moved and "<i>(empty prompt)</i>" in moved
    assert (cell(grid, 0, 0) == np.asarray(prior["lora_train_prior"][0][0])).all()
    assert (cell(grid, 0, 2) != cell(grid, 0, 0)).any()
    # never left active: base weights back, no network loaded, nothing merged
    assert state_hash(model) == base and a1111.networks.loaded_networks == []
    assert all(getattr(m, "network_current_names", ()) == () for m in model.modules())
    # saved in the run folder, next to the previews
    run_dir = tab.job.status().run_dir
    [saved] = [f for f in os.listdir(run_dir) if f.startswith("grid-sks-seed1-")]
    assert Image.open(os.path.join(run_dir, saved)).size == grid.size
    assert f"Saved {os.path.join(run_dir, saved)}" in moved


def test_grid_api_zero_lora_moves_nothing_and_bad_requests_are_refused(a1111, client, tiny_sd1):
    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    hand_made_lora(model, os.path.join(a1111.lora_dir, "zero.safetensors"), up_scale=0.0)
    hand_made_lora(model, os.path.join(a1111.lora_dir, "strong.safetensors"), up_scale=0.05)
    base = state_hash(model)
    payload = {"lora": "zero", "trigger": "sks", "class_word": "woman", "prompts": ["{trigger} wear a hat"],
               "seed": 3, "weights": [1.0], "steps": 2, "resolution": 64}

    zero = client.post("/lora-train/v1/grid", json=payload)
    assert zero.status_code == 200, zero.json()
    body = zero.json()
    assert [(r["prompt"], r["moved"]) for r in body["rows"]] == [
        ("sks", 0.0), ("woman", 0.0), ("", 0.0), ("a photo of woman", 0.0), ("sks wear a hat", 0.0)]
    image = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert image.size == (LABEL_WIDTH + 2 * 64, HEADER_HEIGHT + 5 * 64) and body["moved_at"] == 1.0
    assert os.path.dirname(body["path"]) == os.path.join(a1111.data_path, "outputs", "lora-train", "grids")
    strong = client.post("/lora-train/v1/grid", json={**payload, "lora": "strong"}).json()
    assert all(row["moved"] > 0 for row in strong["rows"])  # a LoRA on every attention moves everything
    assert state_hash(model) == base and not a1111.call_queue.queue_lock.locked()

    for changes, message in [({"lora": "nowhere"}, "no LoRA named 'nowhere'"), ({"trigger": ""}, "trigger must not be empty"),
                             ({"weights": "1"}, "weights must be"), ({"colour": "red"}, "unknown field 'colour'")]:
        refused = client.post("/lora-train/v1/grid", json={**payload, **changes})
        assert refused.status_code == 422 and any(message in d for d in refused.json()["detail"]), refused.json()

    from lora_dreambooth.config import TrainConfig
    from lora_dreambooth.host import entry
    real_process_images = a1111.processing.process_images

    def fail_after_merging(p):  # e.g. out of memory while sampling with the LoRA merged
        result = real_process_images(p)
        if "<lora:" in p.prompt:
            raise RuntimeError("CUDA out of memory")
        return result

    a1111.processing.process_images = fail_after_merging
    with pytest.raises(RuntimeError):
        client.post("/lora-train/v1/grid", json={**payload, "lora": "strong"})
    assert state_hash(model) == base and not a1111.call_queue.queue_lock.locked()
    a1111.processing.process_images = real_process_images
    assert entry.JOB.claim("busy", TrainConfig())  # a training run is active
    assert client.post("/lora-train/v1/grid", json=payload).status_code == 409
    a1111.shared.sd_model = None
    entry.JOB.reset()
