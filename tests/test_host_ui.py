"""The LoRA Train tab inside a stand-in A1111: it builds with every control, and its events
train the tiny model, cancel, fail safely and refuse bad input without writing anything."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from a1111_stub.harness import (QUICK, Event, a1111, component, field_overrides,  # noqa: F401
                                hook_progress, load_model_as_a1111, load_script, merge_like_a1111, png_bytes,
                                start_run, write_images)
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.guard import state_hash


@pytest.fixture
def tab(a1111):
    """The tab as A1111 builds it: settings registered, then on_ui_tabs."""
    load_script()
    a1111.script_callbacks.ui_settings_callback()
    [(blocks, title, tab_id)] = a1111.script_callbacks.ui_tabs_callback()
    from lora_dreambooth.host import entry, paths
    return SimpleNamespace(blocks=blocks, title=title, id=tab_id, job=entry.JOB, ws=paths.workspace())


def upload(tab, kind: str, files: list[tuple[str, str]]) -> dict:
    uploaded = [SimpleNamespace(name=path, orig_name=name) for path, name in files]
    return Event(tab.blocks, f"lora_train_{kind}_add")(overrides={f"lora_train_{kind}_upload": uploaded})


def start(tab, task: str = "task(test1)", **values) -> dict:
    return start_run(tab.blocks, field_overrides(**{**QUICK, **values}), task)


def written(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_tab_builds_with_every_control(a1111, tab):
    from lora_dreambooth.host import settings, ui

    assert (tab.title, tab.id) == ("LoRA Train", "lora_train")
    for name in ui.FORM_FIELDS:
        component(tab.blocks, f"lora_train_{name}")
    every_field = {f for f in TrainConfig.__dataclass_fields__} - {"instance_dir", "class_dir"}
    assert set(ui.FORM_FIELDS) == every_field
    for control in ("instance_upload", "instance_add", "instance_delete", "instance_gallery", "instance_info",
                    "class_upload", "class_add", "class_delete", "class_count", "class_generate",
                    "class_gallery", "preset", "arithmetic", "advanced", "start", "interrupt", "reset",
                    "refresh", "previews", "loss", "log", "send", "lora_prompt", "error"):
        component(tab.blocks, f"lora_train_{control}")
    assert Event(tab.blocks, "lora_train_start", "then").js == "lora_train_start"
    assert Event(tab.blocks, "lora_train_class_generate").js == "lora_train_start_class"
    assert Event(tab.blocks, "lora_train_send").js == "lora_train_send_to_txt2img"
    assert component(tab.blocks, "lora_train_preview_negative_prompt").value == TrainConfig().preview_negative_prompt
    labels = a1111.shared.opts.data_labels
    for key in (settings.OUTPUT_DIR, settings.DEFAULT_PRESET, settings.KEEP_DATASETS):
        assert labels[key].section == ("lora_train", "LoRA Train")


def test_presets_and_the_lecture_arithmetic(a1111, tab):
    changed = Event(tab.blocks, "lora_train_preset", "change")(overrides={"lora_train_preset": "Generative"})
    assert changed["lora_train_regularization"] == 0.2 and changed["lora_train_steps"] == 400
    paths = write_images(str(a1111.data_path) + "/in", 4)
    upload(tab, "instance", [(p, os.path.basename(p)) for p in paths])
    line = Event(tab.blocks, "lora_train_steps", "change")(
        overrides=field_overrides(steps=400, batch_size=2, gradient_accumulation=1))
    assert line["lora_train_arithmetic"].startswith("4 images, batch 2, accumulation 1, 400 steps →")
    assert "200 epochs" in line["lora_train_arithmetic"]


def test_uploads_sanitise_names_and_report_skipped_files(a1111, tab, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes((10, 20, 30)))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not really a png")
    other = tmp_path / "other.png"
    other.write_bytes(png_bytes((30, 20, 10)))
    out = upload(tab, "instance", [(str(good), "../../evil name?.png"), (str(text), "notes.txt"),
                                   (str(fake), "fake.png"), (str(other), "good.png")])
    assert written(tab.ws.instance_dir) == ["evil_name.png", "good.png"]
    assert f"2 images in {tab.ws.instance_dir}" in out["lora_train_instance_info"]
    assert "notes.txt" in out["lora_train_instance_info"] and "fake.png" in out["lora_train_instance_info"]
    assert len(out["lora_train_instance_gallery"]) == 2
    deleted = Event(tab.blocks, "lora_train_instance_delete")()
    assert written(tab.ws.instance_dir) == [] and deleted["lora_train_instance_gallery"] == []


def test_the_same_picture_uploaded_twice_counts_once(a1111, tab, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(png_bytes((10, 20, 30)))
    second.write_bytes(png_bytes((30, 20, 10)))
    out = upload(tab, "instance", [(str(first), "a.png"), (str(first), "copy of a.png")])
    assert written(tab.ws.instance_dir) == ["a.png"]
    assert "copy of a.png: the same picture as a.png: not added twice" in out["lora_train_instance_info"]
    again = upload(tab, "instance", [(str(first), "renamed.png"), (str(second), "b.png")])  # a.png is there
    assert written(tab.ws.instance_dir) == ["a.png", "b.png"]
    assert "renamed.png: the same picture as a.png" in again["lora_train_instance_info"]
    assert f"2 images in {tab.ws.instance_dir}" in again["lora_train_instance_info"]


def test_start_trains_in_place_and_writes_lora_json_and_card(a1111, tab, tiny_sd1, monkeypatch):
    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    base_hash = state_hash(model)
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    merge_like_a1111(layer, torch.full_like(layer.weight, 0.5))  # the last txt2img used a LoRA
    a1111.networks.loaded_networks.append("some_lora")
    requests = []
    real_process_images = a1111.processing.process_images
    monkeypatch.setattr(a1111.processing, "process_images", lambda p: requests.append(p) or real_process_images(p))
    images = write_images(str(a1111.data_path) + "/in", 2)
    upload(tab, "instance", [(p, os.path.basename(p)) for p in images])
    params_txt = os.path.join(a1111.data_path, "params.txt")
    with open(params_txt, "w", encoding="utf8") as f:
        f.write("the user's last txt2img")
    user_cache = (("user's prompt",), "user's conditioning")
    a1111.processing.StableDiffusionProcessing.cached_c[:] = user_cache

    out = start(tab, preview_prompt="sks <lora:other:0.7>, portrait", train_text_encoder=True)

    assert "class='error'" not in out["lora_train_error"]
    lora_dir = a1111.lora_dir
    assert written(lora_dir) == ["sks.json", "sks.png", "sks.safetensors"]
    assert Image.open(os.path.join(lora_dir, "sks.png")).size == (64, 64)
    assert json.load(open(os.path.join(lora_dir, "sks.json")))["activation text"] == "sks"
    assert "sks" in a1111.networks.available_networks  # list refreshed: <lora:sks:1> resolves
    assert out["lora_train_lora_prompt"] == "sks, <lora:sks:1>"
    assert len(out["lora_train_previews"]) == 2 and len(out["lora_train_loss"].data) == 4
    assert "unchanged" in out["lora_train_log"]
    # previews: A1111's sampler, lecture settings, no extra network, nothing saved by A1111
    assert [(p.sampler_name, p.steps, p.cfg_scale, p.do_not_save_samples, p.do_not_save_grid) for p in requests] \
        == [("DPM++ 2M", 2, 5.0, True, True)] * 2
    assert requests[0].prompt == "sks, portrait" and a1111.processing.activated_networks == []
    assert open(params_txt, encoding="utf8").read() == "the user's last txt2img"  # A1111's file kept
    # previews neither reuse nor replace A1111's shared conditioning cache
    assert a1111.processing.StableDiffusionProcessing.cached_c == list(user_cache)
    assert all(p.cached_c is not a1111.processing.StableDiffusionProcessing.cached_c for p in requests)
    # the user's model: A1111's LoRA undone through its own restore path, then untouched
    assert state_hash(model) == base_hash
    assert layer.network_current_names == () and a1111.networks.loaded_networks == []
    assert "test1" in a1111.progress.finished_tasks[-1]
    run_dirs = [d for d in written(os.path.join(a1111.data_path, "outputs", "lora-train")) if d.startswith("sks-")]
    assert len(run_dirs) == 1
    run_files = written(os.path.join(a1111.data_path, "outputs", "lora-train", run_dirs[0]))
    assert {"loss.csv", "config.json", "preview-00002.png", "preview-00004.png"} <= set(run_files)


@pytest.mark.parametrize("how", ["cancel", "interrupt", "stop"])
def test_cancel_or_interrupt_stops_within_a_step_and_saves(a1111, tab, tiny_sd1, monkeypatch, how):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    write_images(tab.ws.instance_dir, 2)
    stop = {"cancel": tab.job.cancel, "interrupt": a1111.state.interrupt,
            "stop": a1111.state.stop_generating}[how]
    hook_progress(monkeypatch, lambda progress: progress.step == 2 and stop())
    out = start(tab, steps=6, preview_every=0)
    status = tab.job.status()
    assert status.state == "cancelled" and status.step == 2
    assert "Cancelled after 2 steps" in out["lora_train_result"]
    assert written(a1111.lora_dir) == ["sks.json", "sks.safetensors"]


def test_an_interrupted_preview_is_neither_kept_nor_the_card(a1111, tab, tiny_sd1, monkeypatch):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    write_images(tab.ws.instance_dir, 2)
    calls = []
    real_process_images = a1111.processing.process_images

    def interrupt_the_second_preview(p):
        calls.append(p)
        if len(calls) == 2:
            a1111.state.interrupt()
        return real_process_images(p)

    monkeypatch.setattr(a1111.processing, "process_images", interrupt_the_second_preview)
    out = start(tab, steps=6, preview_every=2)
    status = tab.job.status()
    assert status.state == "cancelled" and status.step == 4 and len(calls) == 2
    assert [f for f in written(status.run_dir) if f.startswith("preview")] == ["preview-00002.png"]
    assert len(out["lora_train_previews"]) == 1 and "preview at step 4 skipped (stopping)" in out["lora_train_log"]
    card = Image.open(os.path.join(a1111.lora_dir, "sks.png"))
    assert card.tobytes() == Image.open(os.path.join(status.run_dir, "preview-00002.png")).tobytes()


def test_a_failure_restores_the_model_and_writes_nothing(a1111, tab, tiny_sd1, monkeypatch):
    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    before = state_hash(model)
    write_images(tab.ws.instance_dir, 2)
    gc_calls = []
    monkeypatch.setattr(a1111.devices, "torch_gc", lambda: gc_calls.append(1))

    def explode(progress):
        if progress.step == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook_progress(monkeypatch, explode)
    out = start(tab)
    status = tab.job.status()
    assert status.state == "failed" and "Out of GPU memory" in status.error
    assert "Out of GPU memory" in out["lora_train_result"]
    assert written(a1111.lora_dir) == []
    assert state_hash(model) == before and "unchanged" in out["lora_train_log"]
    assert gc_calls  # memory released after the run


@pytest.mark.parametrize("setup, message", [
    (lambda a, m: setattr(a.shared, "sd_model", None), "No Stable Diffusion model is loaded"),
    (lambda a, m: setattr(a.shared.cmd_opts, "lowvram", True), "--lowvram or --medvram"),
    (lambda a, m: setattr(a.shared.cmd_opts, "medvram", True), "--lowvram or --medvram"),
    (lambda a, m: setattr(m, "lowvram", True), "--lowvram or --medvram"),
    (lambda a, m: setattr(a.shared.cmd_opts, "medvram_sdxl", True) or setattr(m, "is_sdxl", True),
     "--lowvram or --medvram"),
    (lambda a, m: setattr(m, "is_sd3", True), "SD3 models are not supported"),
    (lambda a, m: setattr(m.model.diffusion_model, "in_channels", 9), "inpainting / instruct models"),
    (lambda a, m: setattr(m, "is_sdxl", True), "only SDXL base is supported"),
])
def test_refusals_write_nothing(a1111, tab, tiny_sd1, setup, message):
    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    write_images(tab.ws.instance_dir, 2)
    setup(a1111, model)
    out = start(tab)
    assert message in out["lora_train_error"]
    assert written(a1111.lora_dir) == [] and tab.job.status().state == "idle"
    assert written(os.path.join(a1111.data_path, "outputs", "lora-train")) == ["datasets"]


def test_unsupported_dtype_is_refused(a1111, tiny_sd1):
    from lora_dreambooth.host import a1111 as host

    with torch.no_grad():
        tiny_sd1.model.diffusion_model.out[2].weight.data = tiny_sd1.model.diffusion_model.out[2].weight.to(torch.float8_e4m3fn)
    assert any("float8_e4m3fn" in p for p in host.model_problems(load_model_as_a1111(a1111.shared, tiny_sd1)))


@pytest.mark.parametrize("values, message", [
    (dict(trigger="  "), "trigger must not be empty"),
    (dict(trigger="a<b"), "trigger must not contain"),
    (dict(name="../evil"), "LoRA name must not contain path characters"),
    (dict(name="a:b"), "LoRA name must not contain path characters"),
    (dict(steps=10 ** 9), "steps must be between"),
    (dict(learning_rate=5.0), "learning rate must be between"),
    (dict(regularization=0.5, class_prompt="woman"), "no usable class images"),
])
def test_bad_input_is_refused_with_a_message(a1111, tab, tiny_sd1, values, message):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    write_images(tab.ws.instance_dir, 2)
    out = start(tab, **values)
    assert message in out["lora_train_error"]
    assert written(a1111.lora_dir) == []


def test_zero_or_unreadable_images_are_refused(a1111, tab, tiny_sd1):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    assert "no usable instance (dataset) images" in start(tab)["lora_train_error"]
    with open(os.path.join(tab.ws.instance_dir, "broken.png"), "wb") as f:
        f.write(b"\x89PNG broken")
    out = start(tab)["lora_train_error"]
    assert "no usable instance (dataset) images" in out and "broken.png" in out
    assert written(a1111.lora_dir) == []


def test_existing_name_gets_a_suffix_unless_overwrite(a1111, tab, tiny_sd1):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    write_images(tab.ws.instance_dir, 1)
    start(tab, steps=1, preview_every=1)
    second = start(tab, steps=1, preview_every=0, name="sks")
    assert second["lora_train_lora_prompt"] == "sks, <lora:sks-1:1>"
    assert {"sks.safetensors", "sks.png", "sks-1.safetensors", "sks-1.json"} <= set(written(a1111.lora_dir))
    assert "sks-1.png" not in written(a1111.lora_dir)  # no preview in that run: no card
    start(tab, steps=1, preview_every=0, overwrite=True)
    assert "sks.png" not in written(a1111.lora_dir)  # overwritten LoRA keeps no stale card


def test_class_images_are_generated_once_per_prompt_and_model(a1111, tab, tiny_sd1, monkeypatch):
    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    calls = []
    real_process_images = a1111.processing.process_images
    monkeypatch.setattr(a1111.processing, "process_images", lambda p: calls.append(p) or real_process_images(p))
    generate = Event(tab.blocks, "lora_train_class_generate")
    values = {"lora_train_class_prompt": "woman", "lora_train_class_count": 2, "lora_train_resolution": 64,
              "lora_train_preview_steps": 2}
    out = generate("task(class1)", values)
    assert len(out["lora_train_class_gallery"]) == 2 and len(calls) == 2
    manifest = json.load(open(os.path.join(tab.ws.class_dir, ".lora-train-class.json")))
    assert manifest["prompt"] == "woman" and manifest["model_hash"] == "0123abcdef"
    out = generate("task(class2)", values)
    assert len(calls) == 2 and "0 class images generated, 2 reused" in out["lora_train_class_info"]
    model.sd_model_hash = "another"
    generate("task(class3)", values)
    assert len(calls) == 4 and len(os.listdir(tab.ws.class_dir)) == 3  # 2 images + manifest


def test_reset_clears_dataset_class_images_and_log(a1111, tab, tiny_sd1):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    write_images(tab.ws.instance_dir, 1)
    write_images(tab.ws.class_dir, 1)
    start(tab, steps=1, preview_every=0)
    assert tab.job.status().log
    out = Event(tab.blocks, "lora_train_reset")()
    assert written(tab.ws.instance_dir) == written(tab.ws.class_dir) == []
    assert out["lora_train_log"] == "" and tab.job.status().state == "idle"


def test_reset_is_refused_while_a_run_is_active_and_changes_nothing(a1111, tab):
    import gradio as gr

    write_images(tab.ws.instance_dir, 1)
    assert tab.job.claim("busy", TrainConfig())  # a run is active
    reset = Event(tab.blocks, "lora_train_reset")
    result = reset.fn(*[c.value for c in reset.inputs])
    assert len(result) == len(reset.outputs)  # one value per output, the refusal in the error area
    out = reset()
    assert "Cancel the running training first" in out["lora_train_error"]
    assert all(value == gr.update() for key, value in out.items() if key != "lora_train_error")
    assert len(written(tab.ws.instance_dir)) == 1


def test_datasets_are_cleared_after_a_run_when_not_kept(a1111, tab, tiny_sd1):
    from lora_dreambooth.host import settings

    load_model_as_a1111(a1111.shared, tiny_sd1)
    write_images(tab.ws.instance_dir, 1)
    a1111.shared.opts.set(settings.KEEP_DATASETS, False)
    start(tab, steps=1, preview_every=0)
    assert written(tab.ws.instance_dir) == [] and "sks.safetensors" in written(a1111.lora_dir)
