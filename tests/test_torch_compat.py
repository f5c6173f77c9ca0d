"""torch_compat on the torch this suite runs on: CI runs it on A1111 1.10.1's torch 2.1.2 and on
the newest torch, so each test here proves its API on both. Without a GPU the CUDA fp16 branch
runs as far as torch lets it: the scaler a CUDA run builds (disabled without CUDA, as torch
does), stepped through the loop's exact sequence, and an enabled CUDA scaler's state through
the optimizer-state file a resume reads."""
from __future__ import annotations

import os
import re

import pytest
import torch

from lora_dreambooth import resume, torch_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_machine_scaler(monkeypatch) -> torch_compat.GradScaler:
    """The scaler ``cuda_grad_scaler`` builds on a machine with CUDA (enabled): torch decides
    that from ``torch.cuda.is_available`` alone, on 2.1.2 and now."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        scaler = torch_compat.cuda_grad_scaler()
    assert scaler.is_enabled()
    return scaler


def _no_cuda_scaler(monkeypatch) -> torch_compat.GradScaler:
    """The scaler ``cuda_grad_scaler`` builds where CUDA is absent (as in CI), on any machine."""
    with monkeypatch.context() as m, pytest.warns(UserWarning, match="CUDA is not available"):
        m.setattr(torch.cuda, "is_available", lambda: False)
        return torch_compat.cuda_grad_scaler()


def _model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    return layer, torch.optim.AdamW(layer.parameters(), lr=0.1)


def test_scaler_of_a_cuda_run_is_a_grad_scaler_and_off_without_cuda(monkeypatch):
    scaler = _no_cuda_scaler(monkeypatch)
    assert isinstance(scaler, torch_compat.GradScaler) and not scaler.is_enabled()


def test_optimizer_steps_through_the_scaler_as_the_training_loop_does(monkeypatch):
    """loop.TrainingLoop._step's sequence: scale → backward → unscale_ → clip → step → update."""
    layer, optimizer = _model_and_optimizer()
    plain, plain_optimizer = _model_and_optimizer()
    scaler = _no_cuda_scaler(monkeypatch)
    x = torch.randn(5, 4)
    for _ in range(3):
        loss = layer(x).square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        plain(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)
    # without CUDA the scaler passes the loss through and steps the optimizer itself:
    # the same computation as the plain loop, repeated
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.bias, plain.bias)
    assert optimizer.state[layer.weight]["step"].item() == 3


def test_cuda_scaler_state_survives_the_optimizer_state_file(monkeypatch, tmp_path):
    layer, optimizer = _model_and_optimizer()
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    names = {id(layer.weight): "w", id(layer.bias): "b"}
    scaler = _cuda_machine_scaler(monkeypatch)
    # as after 7 clean steps and one backoff on a GPU
    scaler.load_state_dict({**scaler.state_dict(), "scale": 32768.0, "_growth_tracker": 7})
    path = str(tmp_path / resume.OPTIMIZER_FILE)
    resume.save_state(path, optimizer, names, 12, "hash", scaler)

    again, again_optimizer = _model_and_optimizer(seed=1)
    fresh = _cuda_machine_scaler(monkeypatch)
    assert fresh.state_dict()["scale"] == 65536.0
    step = resume.load_state(path, again_optimizer, {id(again.weight): "w", id(again.bias): "b"}, "hash", fresh)
    assert step == 12 and fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 32768.0


def test_a_run_without_scale_resumes_with_a_fresh_scaler(monkeypatch, tmp_path):
    """A CPU/bf16 run's file (no scaler state) resumed by an fp16 CUDA run: default scale."""
    layer, optimizer = _model_and_optimizer()
    names = {id(layer.weight): "w", id(layer.bias): "b"}
    disabled = _no_cuda_scaler(monkeypatch)
    assert torch_compat.scaler_state(disabled) is None and torch_compat.scaler_state(None) is None
    path = str(tmp_path / resume.OPTIMIZER_FILE)
    resume.save_state(path, optimizer, names, 3, "hash", disabled)
    scaler = _cuda_machine_scaler(monkeypatch)
    default = scaler.state_dict()
    assert resume.load_state(path, optimizer, names, "hash", scaler) == 3
    assert scaler.state_dict() == default


def test_autocast_support_probe_agrees_with_autocast():
    assert torch_compat.autocast_supported("cpu", torch.bfloat16)  # every torch in the range
    layer = torch.nn.Linear(2, 2)
    for dtype in (torch.bfloat16, torch.float16):  # fp16 on CPU: current torch only
        try:
            with torch_compat.autocast("cpu", dtype):
                works = layer(torch.ones(1, 2)).dtype == dtype
        except RuntimeError:
            works = False
        assert torch_compat.autocast_supported("cpu", dtype) == works
    with torch_compat.autocast("cpu", None):
        assert layer(torch.ones(1, 2)).dtype == torch.float32


def test_checkpoint_recomputes_with_keyword_arguments_and_reaches_frozen_layers():
    """As model.py uses it: a frozen block whose input needs no gradient, an fp32 parameter
    inside (an adapter), keyword arguments passed through; the block runs again in backward."""
    torch.manual_seed(0)
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    adapter = torch.nn.Parameter(torch.randn(4, 4))
    runs = []

    def block(x, *, scale):
        runs.append(scale)
        return frozen(x) + scale * x @ adapter

    x = torch.randn(3, 4)
    loss = torch_compat.checkpoint(block, x, scale=0.5).square().sum()
    assert runs == [0.5]  # the forward
    loss.backward()
    assert runs == [0.5, 0.5]  # recomputed in backward, with the keyword argument
    checkpointed, adapter.grad = adapter.grad, None
    block(x, scale=0.5).square().sum().backward()
    assert checkpointed is not None
    assert torch.equal(checkpointed, adapter.grad)  # the same computation, recomputed


def test_version_dependent_apis_are_called_only_through_torch_compat():
    pattern = re.compile(r"torch\.amp\.GradScaler|torch\.cuda\.amp|torch\.autocast\(|torch\.utils\.checkpoint")
    offenders = []
    for folder in ("lora_dreambooth", "scripts", "bench"):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                path = os.path.join(root, name)
                if name.endswith(".py") and not path.endswith(os.path.join("lora_dreambooth", "torch_compat.py")):
                    with open(path, encoding="utf-8") as f:
                        offenders += [f"{os.path.relpath(path, ROOT)}: {line.strip()}"
                                      for line in f if pattern.search(line)]
    assert offenders == []


class _Backend:  # what loop.autocast_dtype reads of a backend
    def __init__(self, dtype: torch.dtype, device: str):
        self.unet_dtype, self.device = dtype, torch.device(device)


def test_auto_precision_refuses_weights_this_torch_cannot_autocast(monkeypatch):
    from lora_dreambooth.loop import autocast_dtype
    assert autocast_dtype("auto", _Backend(torch.float32, "cpu")) is None
    assert autocast_dtype("auto", _Backend(torch.bfloat16, "cpu")) == torch.bfloat16
    assert autocast_dtype("auto", _Backend(torch.float16, "cuda")) == torch.float16  # A1111's default
    monkeypatch.setattr(torch_compat, "autocast_supported", lambda device, dtype: False)  # torch 2.1.2, CPU
    with pytest.raises(ValueError, match="cannot autocast to float16 on cpu: start A1111 with --no-half"):
        autocast_dtype("auto", _Backend(torch.float16, "cpu"))
