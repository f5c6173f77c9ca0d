"""A run hands back everything it allocated: after a done, cancelled or failed run through the
host job, the bytes of all live torch tensors are what they were before it (no optimizer
state, cached latents or conditionings, adapters, gradients on base weights, autograd graphs
or tracebacks holding frames survive it); so applying the new LoRA the way A1111 does right
after training costs what applying it to a model that never trained costs."""
from __future__ import annotations

import gc
import os

import pytest
import torch

from a1111_stub.harness import a1111, hook_progress, load_model_as_a1111, write_images  # noqa: F401
from lora_dreambooth import loop
from lora_dreambooth.config import TrainConfig

REAL_LOSS = loop.TrainingLoop._loss  # each run wraps it afresh


def live_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the storages of every tensor Python holds, plus the model's gradients (held in
    C++, invisible to ``gc``). No collection first: what the run left in reference cycles
    counts until the run itself collects it."""
    storages: dict[int, int] = {}
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _run(a1111, tmp_path, how: str, monkeypatch, **changes) -> "object":
    from lora_dreambooth.host import job as job_module

    images = os.path.join(str(tmp_path), f"images-{how}")
    write_images(images, 3)
    settings = dict(trigger="sks", instance_dir=images, steps=4, rank=4, alpha=4.0, resolution=64,
                    preview_every=2, preview_steps=2, learning_rate=1e-3, name=f"m-{how}",
                    train_text_encoder=True, overwrite=True)
    config = TrainConfig(**{**settings, **changes})
    job = job_module.TrainingJob()

    def cancel_at_step_2(progress):
        if progress.phase == "training" and progress.step == 2 and how == "cancelled":
            job.cancel()

    hook_progress(monkeypatch, cancel_at_step_2)
    calls = []

    def loss_then_fail_in_step_3(self, *args):
        """Fails with the step's autograd graph alive in the raising frame, as an OOM would."""
        loss = REAL_LOSS(self, *args)
        calls.append(1)
        if how == "failed" and len(calls) == 3:
            raise RuntimeError("out of memory")
        return loss

    monkeypatch.setattr(loop.TrainingLoop, "_loss", loss_then_fail_in_step_3)
    assert job.claim(how, config)
    return job.run(job_module.RunRequest(config))


def test_done_cancelled_and_failed_runs_leave_no_tensor_behind(a1111, tiny_sd1, tmp_path, monkeypatch):
    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    assert _run(a1111, tmp_path, "warm-up", monkeypatch).state == "done"  # lazy first-use caches
    gc.collect()
    idle = live_tensor_bytes(model)
    for how in ("done", "cancelled", "failed"):
        status = _run(a1111, tmp_path, how, monkeypatch)
        assert status.state == how, status.error
        assert all(p.grad is None for p in model.parameters()), how
        assert live_tensor_bytes(model) == idle, how


def _apply_like_a1111(a1111, model: torch.nn.Module, name: str) -> int:
    """Tensor bytes that applying LoRA ``name`` to ``model`` the way A1111's Lora extension
    does (load the file, back each layer's weights up, merge) adds."""
    gc.collect()
    before = live_tensor_bytes(model)
    a1111.networks.load_networks([name])
    a1111.networks.apply_networks(model)
    gc.collect()
    return live_tensor_bytes(model) - before


def test_sdxl_right_after_training_applying_the_lora_costs_what_it_costs_untrained(a1111, tmp_path, monkeypatch):
    from tiny_models import build_tiny_sdxl

    trained = load_model_as_a1111(a1111.shared, build_tiny_sdxl(seed=0))
    assert _run(a1111, tmp_path, "warm-up", monkeypatch, train_text_encoder=False).state == "done"
    gc.collect()
    idle = live_tensor_bytes(trained)
    status = _run(a1111, tmp_path, "done", monkeypatch, train_text_encoder=False)
    assert status.state == "done" and live_tensor_bytes(trained) == idle
    after_training = _apply_like_a1111(a1111, trained, status.name)

    a1111.networks.loaded_networks.clear()
    untrained = load_model_as_a1111(a1111.shared, build_tiny_sdxl(seed=0))
    untouched = _apply_like_a1111(a1111, untrained, status.name)
    backups = sum(m.network_weights_backup.nbytes for m in untrained.modules()
                  if getattr(m, "network_weights_backup", None) is not None)
    assert backups > 0 and after_training == untouched


@pytest.mark.parametrize("free_gib, warned", [(0.25, True), (64.0, False)])
def test_the_log_warns_when_a1111s_lora_backups_would_not_fit(a1111, tiny_sd1, tmp_path, monkeypatch, free_gib, warned):
    from lora_dreambooth.host import headroom

    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    named = [m for m in model.modules() if getattr(m, "network_layer_name", None)]
    backups = headroom.backup_bytes(model)
    assert named and backups == sum(p.nbytes for m in named for p in m.parameters(recurse=False))
    monkeypatch.setattr(headroom, "available_bytes", lambda: int(free_gib * headroom.GIB) + backups)
    status = _run(a1111, tmp_path, "done", monkeypatch)
    assert status.state == "done"
    assert any("memory is tight" in line for line in status.log) == warned
