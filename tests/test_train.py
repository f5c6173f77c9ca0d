"""The training loop end to end on the tiny ldm model: what a run writes, how it stops, how
it fails, and that the user's model ends exactly as it began."""
from __future__ import annotations

import base64
import copy
import csv
import io
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from a1111_lora import a1111_delta
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data import NoImagesError
from lora_dreambooth.demo import draw_character, draw_class_image, write_images
from lora_dreambooth.guard import ModelSnapshot, state_hash
from lora_dreambooth.model import LdmBackend
from lora_dreambooth.targets import find_targets
from lora_dreambooth.objective import min_snr_weights, prior_preservation_loss
from lora_dreambooth.train import TrainCallbacks, TrainingError, train_lora


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    return {"instance": write_images(str(root / "instance"), draw_character, 3),
            "class": write_images(str(root / "class"), draw_class_image, 3)}


def make_config(images: dict[str, str], **changes) -> TrainConfig:
    values = dict(trigger="wpg", instance_dir=images["instance"], steps=3, learning_rate=1e-3,
                  batch_size=1, rank=4, alpha=4.0, resolution=64, preview_steps=2, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def run(model, config: TrainConfig, tmp_path, callbacks: TrainCallbacks | None = None):
    return train_lora(model, config, str(tmp_path / "lora"), str(tmp_path / "run"), callbacks)


def test_a_run_writes_the_lora_sidecar_previews_and_logs(tiny_sd1, images, tmp_path):
    before = state_hash(tiny_sd1)
    modules_before = dict(tiny_sd1.named_modules())
    progress = []
    config = make_config(images, steps=4, preview_every=2, class_dir=images["class"],
                         class_prompt="a photo of a person", regularization=0.5)
    result = run(tiny_sd1, config, tmp_path, TrainCallbacks(on_progress=progress.append))

    assert state_hash(tiny_sd1) == before
    assert all(modules_before[name] is module for name, module in tiny_sd1.named_modules())
    assert result.path == str(tmp_path / "lora" / "wpg.safetensors") and not result.cancelled
    with safe_open(result.path, "pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["ss_steps"] == "4" and metadata["ss_output_name"] == "wpg"
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in keys)
    assert json.load(open(result.sidecar_path))["activation text"] == "wpg"
    assert [os.path.basename(p) for p in result.previews] == ["preview-00002.png", "preview-00004.png"]
    assert Image.open(result.previews[0]).size == (64, 64)
    rows = list(csv.DictReader(open(tmp_path / "run" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert json.load(open(tmp_path / "run" / "config.json"))["regularization"] == 0.5
    training = [p for p in progress if p.phase == "training"]
    assert [p.step for p in training] == [1, 2, 3, 4] and all(p.total == 4 for p in training)
    assert all(p.loss > 0 and p.lr == pytest.approx(1e-3) and p.samples_per_s > 0 for p in training)
    assert training[-1].eta_s == 0


def apply_exported(model, path: str) -> None:
    """Merge an exported file into ``model`` the way A1111's loader computes it."""
    tensors = load_file(path)
    for target in find_targets(model, "lora", train_text_encoder=True):
        weights = {key[len(target.kohya_name) + 1:]: value for key, value in tensors.items()
                   if key.startswith(target.kohya_name + ".")}
        if weights:
            module = model.get_submodule(target.path)
            with torch.no_grad():
                module.weight += a1111_delta(weights, module.weight).to(module.weight.dtype)


def denoising_loss(model, pixels: torch.Tensor, prompt: str) -> float:
    """Mean ε-prediction error over fixed noise and timesteps."""
    backend = LdmBackend(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = backend.latents_from_moments(backend.encode_moments(pixels), generator)
        latents = latents.repeat(8, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.linspace(50, 950, 8).long()
        noisy = backend.training_scheduler().add_noise(latents, noise, timesteps)
        cond = backend.encode_prompts([prompt] * 8)
        return torch.nn.functional.mse_loss(backend.predict(noisy, timesteps, cond), noise).item()


def test_the_exported_lora_lowers_the_training_loss_when_a1111_applies_it(tiny_sd1, images, tmp_path):
    pristine = copy.deepcopy(tiny_sd1)
    pixels = torch.from_numpy(__import__("numpy").asarray(draw_character(0))).permute(2, 0, 1)[None]
    pixels = pixels.float() / 127.5 - 1
    result = run(tiny_sd1, make_config(images, steps=20, learning_rate=1e-2, rank=8, alpha=8.0,
                                       save_dtype="fp32", train_text_encoder=True), tmp_path)
    base_loss = denoising_loss(pristine, pixels, "wpg")
    apply_exported(pristine, result.path)
    assert denoising_loss(pristine, pixels, "wpg") < 0.9 * base_loss


def test_same_seed_same_result_on_cpu(tiny_sd1, images, tmp_path):
    twin = copy.deepcopy(tiny_sd1)
    config = make_config(images, class_dir=images["class"], class_prompt="person", regularization=1.0,
                         save_dtype="fp32", noise_offset=0.05, min_snr_gamma=5.0)
    first = run(tiny_sd1, config, tmp_path / "a")
    second = run(twin, config, tmp_path / "b")
    assert first.losses == second.losses
    a, b = load_file(first.path), load_file(second.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = run(copy.deepcopy(twin), make_config(images, seed=4, save_dtype="fp32", class_dir=images["class"],
                                                  class_prompt="person", regularization=1.0,
                                                  noise_offset=0.05, min_snr_gamma=5.0), tmp_path / "c")
    assert other.losses != first.losses


def test_a_step_is_batch_times_accumulation_samples(tiny_sd1, images, tmp_path):
    micro_batches = []
    backend_predict = LdmBackend.predict

    def counting_predict(self, noisy, timesteps, cond):
        micro_batches.append(noisy.shape[0])
        return backend_predict(self, noisy, timesteps, cond)

    LdmBackend.predict = counting_predict
    try:
        config = make_config(images, steps=2, batch_size=2, gradient_accumulation=3,
                             class_dir=images["class"], class_prompt="person", regularization=0.3)
        result = run(tiny_sd1, config, tmp_path)
    finally:
        LdmBackend.predict = backend_predict
    # 2 steps × 3 micro-batches, each 2 instance + 2 class samples
    assert micro_batches == [4] * 6
    assert result.steps_done == 2


def test_prior_preservation_loss_is_instance_plus_strength_times_class():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_class = torch.tensor([False, False, True, True])
    assert prior_preservation_loss(per_sample, is_class, 0.5).item() == pytest.approx(2.0 + 0.5 * 15.0)
    assert prior_preservation_loss(per_sample[:2], is_class[:2], 0.5).item() == pytest.approx(2.0)


def test_min_snr_weighting(tiny_sd1):
    scheduler = LdmBackend(tiny_sd1).training_scheduler()
    timesteps = torch.tensor([1, 100, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    eps = min_snr_weights(scheduler, timesteps, 5.0, "eps")
    assert torch.allclose(eps, torch.clamp(snr, max=5.0) / snr, rtol=1e-5)
    assert eps[0] < 1 and eps[-1] == pytest.approx(1.0)
    v = min_snr_weights(scheduler, timesteps, 5.0, "v")
    assert torch.allclose(v, torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5)
    assert torch.equal(min_snr_weights(scheduler, timesteps, 0.0, "eps"), torch.ones(4))


def test_stop_saves_what_was_trained(tiny_sd1, images, tmp_path):
    before = state_hash(tiny_sd1)
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 4  # micro-batches 1-4 run: with accumulation 2 that is 2 steps

    result = run(tiny_sd1, make_config(images, steps=10, gradient_accumulation=2), tmp_path,
                 TrainCallbacks(should_stop=should_stop))
    assert result.cancelled and result.steps_done == 2
    with safe_open(result.path, "pt") as f:
        assert f.metadata()["ss_steps"] == "2"
    assert state_hash(tiny_sd1) == before


def test_stop_before_the_first_step_writes_nothing(tiny_sd1, images, tmp_path):
    result = run(tiny_sd1, make_config(images), tmp_path, TrainCallbacks(should_stop=lambda: True))
    assert result.cancelled and result.steps_done == 0 and result.path is None
    assert not os.path.exists(tmp_path / "lora") or os.listdir(tmp_path / "lora") == []


def test_an_interrupted_preview_is_neither_saved_nor_the_cover(tiny_sd1, images, tmp_path):
    stopping, shown, logged = [], [], []

    def render(step: int):  # as the host's: the first preview finishes, the second is cut short
        if step == 4:
            stopping.append(step)
            return None
        return Image.new("RGB", (64, 64), (200, 10, 10))

    result = run(tiny_sd1, make_config(images, steps=6, preview_every=2), tmp_path,
                 TrainCallbacks(render_preview=render, on_preview=lambda step, image, path: shown.append(step),
                                should_stop=lambda: bool(stopping), on_log=logged.append))
    assert result.cancelled and result.steps_done == 4
    assert [os.path.basename(p) for p in result.previews] == ["preview-00002.png"] and shown == [2]
    assert not os.path.exists(tmp_path / "run" / "preview-00004.png")
    assert "preview at step 4 skipped (stopping)" in logged
    with safe_open(result.path, "pt") as f:
        [cover] = json.loads(f.metadata()["ssmd_cover_images"])
    assert Image.open(io.BytesIO(base64.b64decode(cover))).getpixel((0, 0)) == (200, 10, 10)


def test_a_failure_restores_the_model_and_writes_nothing(tiny_sd1, images, tmp_path):
    tiny_sd1.model.diffusion_model.input_blocks[1].train()  # an unusual flag, to see it kept
    snapshot = ModelSnapshot.take(tiny_sd1)

    def explode(progress):
        if progress.step == 2:
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(TrainingError, match="out of memory"):
        run(tiny_sd1, make_config(images, steps=5, train_text_encoder=True), tmp_path,
            TrainCallbacks(on_progress=explode))
    assert snapshot.differences(tiny_sd1) == []
    assert tiny_sd1.model.diffusion_model.input_blocks[1].training
    assert all(p.grad is None for p in tiny_sd1.parameters())
    assert not os.path.exists(tmp_path / "lora") or os.listdir(tmp_path / "lora") == []


def test_no_usable_image_fails_before_the_model_is_touched(tiny_sd1, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.png").write_bytes(b"not an image")
    touched = []
    tiny_sd1.register_forward_pre_hook(lambda *a: touched.append(1))
    with pytest.raises(NoImagesError, match="notes.png"):
        run(tiny_sd1, TrainConfig(trigger="wpg", instance_dir=str(folder), resolution=64), tmp_path)
    assert touched == []


def test_latents_are_encoded_once_when_cached_and_every_step_when_augmented(tiny_sd1, images, tmp_path):
    encoded = []
    original = LdmBackend.encode_moments

    def counting(self, pixels):
        encoded.append(pixels.shape[0])
        return original(self, pixels)

    LdmBackend.encode_moments = counting
    try:
        run(tiny_sd1, make_config(images, steps=4), tmp_path / "cached")
        assert sum(encoded) == 3  # three instance images, once
        encoded.clear()
        run(tiny_sd1, make_config(images, steps=4, augment=True), tmp_path / "augmented")
        assert encoded == [1, 1, 1, 1]
    finally:
        LdmBackend.encode_moments = original


def test_learning_rate_schedules_and_text_encoder_rate(tiny_sd1, images, tmp_path):
    lrs = []
    config = make_config(images, steps=6, lr_schedule="cosine", lr_warmup_steps=2, train_text_encoder=True)
    result = run(tiny_sd1, config, tmp_path, TrainCallbacks(on_progress=lambda p: p.phase == "training" and lrs.append(p.lr)))
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3)  # warmup, then the peak
    assert lrs[2] > lrs[4] > lrs[5]  # cosine decay
    with safe_open(result.path, "pt") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in f.keys())


def test_save_every_writes_numbered_files_in_the_run_folder(tiny_sd1, images, tmp_path):
    result = run(tiny_sd1, make_config(images, steps=4, save_every=2), tmp_path)
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.endswith(".safetensors")) == [
        "optimizer.safetensors", "wpg-step00002.safetensors"]  # optimizer state: see test_resume.py
    assert sorted(os.listdir(tmp_path / "lora")) == ["wpg.json", "wpg.safetensors"]
    assert result.steps_done == 4


def test_half_precision_base_trains_fp32_adapters_under_autocast(tiny_sd1, images, tmp_path):
    # A1111 holds the UNet in half precision: its Linear/Conv weights here in bf16 (CPU autocast
    # covers those; ldm's GroupNorm32 needs CUDA autocast for half weights).
    for module in tiny_sd1.model.diffusion_model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(torch.bfloat16)
    before = state_hash(tiny_sd1)
    result = run(tiny_sd1, make_config(images, steps=2, save_dtype="fp32"), tmp_path)
    assert state_hash(tiny_sd1) == before
    assert next(tiny_sd1.model.diffusion_model.parameters()).dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in load_file(result.path).values())
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_the_wrapped_a1111_embedder_trains_the_text_encoder(tiny_sd1, images, tmp_path):
    from test_model import A1111StyleEmbedder
    tiny_sd1.cond_stage_model = A1111StyleEmbedder(tiny_sd1.cond_stage_model)
    before = state_hash(tiny_sd1)
    result = run(tiny_sd1, make_config(images, steps=2, train_text_encoder=True), tmp_path)
    assert state_hash(tiny_sd1) == before
    with safe_open(result.path, "pt") as f:
        assert any(k.startswith("lora_te_") for k in f.keys())


def test_8bit_adamw_falls_back_with_a_message_without_cuda(tiny_sd1, images, tmp_path):
    messages = []
    result = run(tiny_sd1, make_config(images, steps=1, optimizer="adamw8bit"), tmp_path,
                 TrainCallbacks(on_log=messages.append))
    assert "8-bit AdamW needs bitsandbytes and a CUDA GPU: using AdamW instead" in messages
    assert result.steps_done == 1


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_conditionings_are_cached_only_while_the_text_encoder_is_frozen(tiny_sd1, images, tmp_path, encoded_prompts,
                                                                        train_text_encoder):
    calls = encoded_prompts
    run(tiny_sd1, make_config(images, steps=3, train_text_encoder=train_text_encoder,
                              class_dir=images["class"], class_prompt="person", regularization=1.0),
        tmp_path)
    if train_text_encoder:  # every micro-batch, with gradients
        assert calls == [(["wpg", "person"], True)] * 3
    else:  # each distinct prompt once, without gradients
        assert sorted(c[0][0] for c in calls) == ["person", "wpg"] and not any(c[1] for c in calls)
