"""Adapters go in and come out of the tiny ldm model without a trace (proven with hashes),
train in fp32 on any base dtype, and the guard notices every kind of change."""
from __future__ import annotations

import pytest
import torch

from conftest import LOW_PRECISION_BASES
from lora_dreambooth import networks
from lora_dreambooth.adapters import Adapters, inject
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.guard import ModelSnapshot, state_hash
from lora_dreambooth.targets import Target, find_targets

NETWORKS = networks.NAMES


@pytest.fixture(scope="module")
def model(tiny_clip_dir):
    """One model shared by the tests that leave it exactly as they found it."""
    from lora_dreambooth.tiny import build_tiny_sd1
    m = build_tiny_sd1(seed=0, clip_dir=tiny_clip_dir)
    before = state_hash(m)
    yield m
    assert state_hash(m) == before


def _config(network: str) -> TrainConfig:
    return TrainConfig(network=network, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)


def _inputs(model, prompt: str = "a photo of sks"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    return x, torch.tensor([500]), model.get_learned_conditioning([prompt])


def _unet_out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.apply_model(*inputs)


def _randomise(adapters: Adapters, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapters.parameters_for("unet") + adapters.parameters_for("te"):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("network", NETWORKS)
def test_inject_starts_at_zero_delta_with_fp32_trainable_adapters(model, network):
    targets = find_targets(model, network, train_text_encoder=True)
    inputs = _inputs(model)
    before = _unet_out(model, inputs)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    adapters = inject(model, targets, _config(network))
    try:
        assert adapters.network == network and adapters.targets == targets
        assert len(adapters.layers) == len(targets)
        for layer in adapters.layers:
            assert model.get_submodule(layer.target.path) is layer.wrapper
            assert layer.wrapper.get_base_layer() is layer.base
            conv3 = isinstance(layer.base, torch.nn.Conv2d) and layer.base.kernel_size != (1, 1)
            assert (layer.rank, layer.alpha) == ((2, 1.0) if conv3 else (4, 2.0))
            assert layer.wrapper.training == layer.base.training
        unet, te = adapters.parameters_for("unet"), adapters.parameters_for("te")
        assert unet and te and not {id(p) for p in unet} & {id(p) for p in te}
        assert all(p.dtype == torch.float32 and p.requires_grad and p.device.type == "cpu" for p in unet + te)
        # base parameters keep their requires_grad, whatever it was
        base_grads = {name.replace(".base_layer.", "."): p.requires_grad for name, p in model.named_parameters()
                      if not any(s in name for s in ("lora_", "hada_", "lokr_"))}
        assert base_grads == grads
        assert torch.equal(_unet_out(model, inputs), before)  # zero-initialised delta
    finally:
        adapters.remove()


def test_remove_restores_weights_modules_and_unusual_flags(tiny_sd1):
    model = tiny_sd1
    unet = model.model.diffusion_model
    to_q = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    # Unusual flags: they must come back as they were, not be reset to a default.
    unet.input_blocks[1].training = True
    to_q.training = True
    to_q.weight.requires_grad_(False)
    proj_in = unet.input_blocks[1][1].proj_in
    proj_in.bias.requires_grad_(False)
    model.cond_stage_model.training = True  # its .train() is ldm's no-op
    hook = unet.input_blocks[1].register_forward_hook(lambda *args: None)
    modules = dict(model.named_modules())
    snapshot = ModelSnapshot.take(model)
    before = state_hash(model)

    targets = find_targets(model, "locon", train_text_encoder=True)
    for network in NETWORKS:
        adapters = inject(model, targets, _config(network))
        _randomise(adapters)
        params = adapters.parameters_for("unet") + adapters.parameters_for("te")
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        loss = model.apply_model(*_inputs(model)).square().mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        optimizer.step()
        adapters.remove()
        adapters.remove()  # idempotent
        assert snapshot.differences(model) == [], network
        assert state_hash(model) == before
        model.zero_grad(set_to_none=True)  # base weights got gradients: they had requires_grad

    assert all(modules[name] is m for name, m in model.named_modules())
    assert unet.input_blocks[1].training and to_q.training and not unet.input_blocks[2].training
    assert not to_q.weight.requires_grad and not proj_in.bias.requires_grad and proj_in.weight.requires_grad
    assert model.cond_stage_model.training
    hook.remove()


def test_text_encoder_targets(model):
    targets = [t for t in find_targets(model, "lora", train_text_encoder=True) if t.part == "te"]
    assert targets and all(t.kohya_name.startswith("lora_te_text_model_encoder_layers_") for t in targets)
    prompt = ["a photo of sks"]
    before = model.get_learned_conditioning(prompt)
    adapters = inject(model, targets, _config("loha"))
    try:
        assert adapters.parameters_for("unet") == [] and adapters.parameters_for("te")
        _randomise(adapters)
        cond = model.get_learned_conditioning(prompt)
        assert not torch.allclose(cond, before)
        cond.square().mean().backward()
        assert all(p.grad is not None for p in adapters.parameters_for("te"))
    finally:
        adapters.remove()
    assert torch.equal(model.get_learned_conditioning(prompt), before)


def test_failed_inject_undoes_what_it_did(model):
    snapshot = ModelSnapshot.take(model)
    good = find_targets(model, "lora")[:5]
    norm = Target("lora_unet_x_norm", "model.diffusion_model.input_blocks.1.1.norm", "unet")
    with pytest.raises(TypeError, match="GroupNorm"):
        inject(model, good + [norm], _config("lora"))
    assert snapshot.differences(model) == []
    with pytest.raises(ValueError, match="already has an adapter"):
        inject(model, good + good[:1], _config("loha"))
    assert snapshot.differences(model) == []
    with pytest.raises(AttributeError):
        inject(model, good + [Target("x", "model.diffusion_model.nowhere.to_q", "unet")], _config("lokr"))
    assert snapshot.differences(model) == []


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("dtype, device", LOW_PRECISION_BASES)
def test_adapters_stay_fp32_on_a_low_precision_base(tiny_sd1, network, dtype, device):
    # A1111 holds fp16 weights; torch 2.1.2's CPU build has no fp16 matmul, so fp16 runs this
    # code on the meta device (dtypes and shapes, no kernels) and bf16 runs its numbers on the CPU.
    model = tiny_sd1.to(device, dtype)
    computed = device == "cpu"
    before = state_hash(model) if computed else None
    adapters = inject(model, find_targets(model, network, train_text_encoder=True), _config(network))
    try:
        _randomise(adapters)
        for layer in adapters.layers:
            assert layer.base.weight.dtype == dtype
            assert all(p.dtype == torch.float32 for p in layer.parameters())
            shape = (2, layer.base.in_channels, 4, 4) if isinstance(layer.base, torch.nn.Conv2d) \
                else (2, layer.base.in_features)
            x = torch.randn(shape, dtype=dtype, device=device)
            out = layer.wrapper(x)  # no autocast: fp32 adapter on a half-precision base
            assert out.dtype == dtype and (not computed or torch.isfinite(out).all())
            out.float().square().sum().backward()
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    finally:
        adapters.remove()
    assert not computed or state_hash(model) == before
    assert model.model.diffusion_model.input_blocks[1][1].proj_in.weight.dtype == dtype


def test_guard_reports_every_kind_of_change(tiny_sd1):
    model = tiny_sd1
    snapshot = ModelSnapshot.take(model)
    assert snapshot.differences(model) == [] and snapshot.hash == state_hash(model)
    unet = model.model.diffusion_model
    block = unet.input_blocks[1][1]

    model.train()  # ldm's first/cond stage models ignore .train(); set one directly
    model.first_stage_model.training = True
    unet.out[2].weight.requires_grad_(False)
    hook = block.register_forward_pre_hook(lambda *args: None)
    found = snapshot.differences(model)
    assert "module model.diffusion_model training flag False -> True" in found
    assert "module first_stage_model training flag False -> True" in found
    assert "parameter model.diffusion_model.out.2.weight requires_grad True -> False" in found
    assert "module model.diffusion_model.input_blocks.1.1 hooks changed" in found
    snapshot.restore_flags(model)
    hook.remove()
    assert snapshot.differences(model) == []

    with torch.no_grad():
        block.proj_in.weight[0, 0, 0, 0] += 1e-3
    block.proj_out = torch.nn.Conv2d(32, 32, 1)
    unet.out[2].to(torch.float64)
    found = snapshot.differences(model)
    assert "tensor model.diffusion_model.input_blocks.1.1.proj_in.weight values changed" in found
    assert "module model.diffusion_model.input_blocks.1.1.proj_out replaced" in found
    assert any(m.startswith("tensor model.diffusion_model.out.2.weight moved torch.float32@cpu -> "
                            "torch.float64@cpu") for m in found)
    assert state_hash(model) != snapshot.hash
