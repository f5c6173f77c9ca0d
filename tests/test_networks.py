"""Every registered network type round-trips on the tiny SD1 model: trained a few steps, saved
as a LoRA file, applied the way A1111 1.10.1 applies it (``a1111_lora.py``, proven against the
real loader's golden table in test_export.py) it gives what was trained, and a resume reads it
back exactly. Then DoRA's per-input-column magnitude, and the registry's users."""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from a1111_lora import a1111_delta, apply_weight, assert_a1111_exact, file_weights, probe
from a1111_stub.harness import a1111, api_client, load_model_as_a1111, png_bytes  # noqa: F401
from lora_dreambooth import networks, resume
from lora_dreambooth.adapters import inject, network_problem
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.export import layer_tensors, save_lora
from lora_dreambooth.networks.dora import column_norm
from lora_dreambooth.targets import find_targets
from tiny_models import build_tiny_sd2


def _config(network: str) -> TrainConfig:
    return TrainConfig(network=network, rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, train_text_encoder=True,
                       save_dtype="fp32", trigger="sks", overwrite=True)


def _inputs(model):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([300, 700])


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's conditioning and the UNet's prediction with it."""
    x, t = _inputs(model)
    cond = model.get_learned_conditioning(["a photo of sks", "sks"])
    return cond, model.apply_model(x, t, cond)


def _train(adapters, model, steps: int = 3) -> None:
    """A few AdamW steps on an arbitrary loss: every adapter weight moves off its start."""
    params = adapters.parameters_for("unet") + adapters.parameters_for("te")
    optimizer = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0, eps=1e-20)  # tiny gradients move too
    for _ in range(steps):
        cond, out = _outputs(model)
        (out.square().mean() + cond.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _kind(module: torch.nn.Module) -> str:
    return f"conv{module.kernel_size[0]}" if isinstance(module, torch.nn.Conv2d) else "linear"


@pytest.mark.parametrize("network", networks.NAMES)
def test_every_type_round_trips_train_export_a1111_resume(tiny_sd1, tmp_path, network):
    model, config = tiny_sd1, _config(network)
    with torch.no_grad():
        base = _outputs(model)
    adapters = inject(model, find_targets(model, network, train_text_encoder=True), config)
    _train(adapters, model)
    trained = {layer.target.kohya_name: {k: p.detach().clone() for k, p in layer_tensors(layer, network).items()}
               for layer in adapters.layers}
    saved = save_lora(adapters, config, str(tmp_path), sd_version="sd1", steps_done=3, num_train_images=2,
                      tag_frequency={})
    tensors = load_file(saved.path)

    # Layer by layer: the trained layer is the base layer with A1111's merged weight.
    assert_a1111_exact(adapters, tensors)
    kinds = {_kind(layer.base) for layer in adapters.layers}
    with torch.no_grad():
        trained_out = _outputs(model)
    assert kinds == ({"linear", "conv1", "conv3"} if networks.get(network).convs else {"linear", "conv1"})

    # The whole model: A1111's merge of the file into the plain model gives the trained outputs.
    adapters.remove()
    a1111_model = copy.deepcopy(model)
    with torch.no_grad():
        for target in adapters.targets:
            module = a1111_model.get_submodule(target.path)
            module.weight += a1111_delta(file_weights(tensors, target.kohya_name), module.weight)
        for got, expected, plain in zip(_outputs(a1111_model), trained_out, base):
            assert (got - expected).norm() <= 1e-4 * (expected - plain).norm()

    # Resume: the file's type is recognised and every tensor comes back exactly.
    source = resume.read_lora(saved.path)
    assert networks.from_metadata(source.metadata) is networks.get(network)
    again = inject(model, find_targets(model, network, train_text_encoder=True), config)
    try:
        resume.load_lora(source, again, None, config, "sd1")
        for layer in again.layers:
            loaded = layer_tensors(layer, network)
            assert loaded.keys() == trained[layer.target.kohya_name].keys()
            for suffix, param in loaded.items():
                assert torch.equal(param, trained[layer.target.kohya_name][suffix]), suffix
        with torch.no_grad():
            for got, expected in zip(_outputs(model), trained_out):
                assert torch.equal(got, expected)
    finally:
        again.remove()


# --- DoRA ---------------------------------------------------------------------------------

def test_dora_magnitude_is_per_input_column_like_a1111(tiny_sd1):
    """``dora_scale`` has A1111's shape and starts at the base's column norms (delta 0); after
    training both the magnitude and the low-rank part have moved."""
    model = tiny_sd1
    adapters = inject(model, find_targets(model, "dora", train_text_encoder=True), _config("dora"))
    try:
        start = {}
        for layer in adapters.layers:
            scale = layer_tensors(layer, "dora")["dora_scale"]
            weight = layer.base.weight
            expected_shape = (1, weight.shape[1]) + (1, 1) * (weight.dim() == 4)
            assert tuple(scale.shape) == expected_shape and scale.dtype == torch.float32
            assert torch.equal(scale, column_norm(weight.float())), layer.target.path
            start[layer.target.path] = scale.detach().clone()
        _train(adapters, model)
        for layer in adapters.layers:
            tensors = layer_tensors(layer, "dora")
            assert not torch.equal(tensors["dora_scale"], start[layer.target.path])
            assert tensors["lora_up.weight"].abs().sum() > 0
    finally:
        adapters.remove()


@pytest.mark.parametrize("kind", ["linear", "conv1", "conv3"])
def test_dora_is_what_a1111_applies_and_not_peft_row_norm(tiny_sd1, kind):
    """One target of each kind, magnitude and low-rank part set far from their start: A1111's
    per-column formula reproduces the layer. With the magnitude back at its start and the same
    delta, the layer is not what peft's per-row rule gives (M = W + s·up@down rescaled per
    output row to W's row norms; with no delta both rules give W)."""
    model = tiny_sd1
    target = next(t for t in find_targets(model, "dora") if _kind(model.get_submodule(t.path)) == kind)
    adapters = inject(model, [target], _config("dora"))
    try:
        layer = adapters.layers[0]
        tensors = layer_tensors(layer, "dora")
        gen = torch.Generator().manual_seed(3)
        weight = layer.base.weight

        def a1111_applies(x: torch.Tensor) -> torch.Tensor:
            file = {k: v.detach().clone() for k, v in tensors.items()} | {"alpha": torch.tensor(layer.alpha)}
            return apply_weight(layer.base, x, weight + a1111_delta(file, weight))

        with torch.no_grad():
            for suffix in ("lora_down.weight", "lora_up.weight"):
                tensors[suffix].copy_(torch.randn(tensors[suffix].shape, generator=gen) * 0.3)
            start = tensors["dora_scale"].clone()
            tensors["dora_scale"].mul_(1 + 0.5 * torch.rand(start.shape, generator=gen))
            x = probe(layer.base, gen)
            got, plain = layer.wrapper(x), layer.base(x)
            assert (got - a1111_applies(x)).norm() <= 1e-4 * (got - plain).norm()

            tensors["dora_scale"].copy_(start)  # ||W||_col, where training starts it
            got = layer.wrapper(x)
            assert (got - a1111_applies(x)).norm() <= 1e-4 * (got - plain).norm()

            def row_norm(w: torch.Tensor) -> torch.Tensor:
                return w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))

            def peft_rule(merged: torch.Tensor) -> torch.Tensor:
                return merged * row_norm(weight) / row_norm(merged)  # magnitude ||W||_row, peft's start

            assert torch.allclose(peft_rule(weight), weight)
            low_rank = (tensors["lora_up.weight"].flatten(1) @ tensors["lora_down.weight"].flatten(1))
            merged = weight + low_rank.reshape(weight.shape) * layer.alpha / layer.rank
            peft_like = apply_weight(layer.base, x, peft_rule(merged))
            assert (got - peft_like).norm() > 1e-2 * (got - plain).norm()
    finally:
        adapters.remove()


# --- the registry's users -------------------------------------------------------------------

def test_config_and_metadata_ask_the_registry():
    for name in networks.NAMES:
        assert not [p for p in TrainConfig(network=name).problems() if "network" in p]
    problems = [p for p in TrainConfig(network="glora").problems() if "network" in p]
    assert problems == [f"network type must be one of: {', '.join(networks.NAMES)}"]
    with pytest.raises(ValueError, match="unknown network type 'glora'"):
        networks.get("glora")
    # Files of other trainers: kohya's LoRA, LyCORIS' LoCon, and LyCORIS' DoRA (LoCon + dora_wd).
    assert networks.from_metadata({"ss_network_module": "networks.lora"}) is networks.get("lora")
    lycoris = {"ss_network_module": "lycoris.kohya"}
    assert networks.from_metadata({**lycoris, "ss_network_args": json.dumps({"algo": "locon"})}).name == "locon"
    dora = json.dumps({"algo": "locon", "dora_wd": "True", "conv_dim": "4"})
    assert networks.from_metadata({**lycoris, "ss_network_args": dora}).name == "dora"
    assert networks.from_metadata({**lycoris, "ss_network_args": json.dumps({"algo": "glora"})}) is None


def test_resume_refuses_another_type_naming_it(tiny_sd1, tmp_path):
    model = tiny_sd1
    config = _config("dora")
    adapters = inject(model, find_targets(model, "dora", train_text_encoder=True), config)
    saved = save_lora(adapters, config, str(tmp_path), sd_version="sd1", steps_done=1, num_train_images=1,
                      tag_frequency={})
    adapters.remove()
    with safe_open(saved.path, "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"algo": "locon", "dora_wd": "True",
                                                               "conv_dim": "2", "conv_alpha": "3.0"}
    locon = inject(model, find_targets(model, "locon", train_text_encoder=True), _config("locon"))
    try:
        with pytest.raises(resume.ResumeError, match="it is a DoRA network: set network type to dora"):
            resume.load_lora(resume.read_lora(saved.path), locon, None, _config("locon"), "sd1")
    finally:
        locon.remove()


def test_dora_scale_stays_fp32_in_an_fp16_file(tiny_sd1, tmp_path):
    """``dora_scale`` scales whole columns of the merged weight: fp16 rounding there would move
    the base weight itself, so it is written in fp32 while the rest follows the save precision."""
    model = tiny_sd1
    config = dataclasses.replace(_config("dora"), save_dtype="fp16")
    adapters = inject(model, find_targets(model, "dora"), config)
    try:
        saved = save_lora(adapters, config, str(tmp_path), sd_version="sd1", steps_done=1, num_train_images=1,
                          tag_frequency={})
    finally:
        adapters.remove()
    dtypes = {key.rsplit(".", 1)[-1] if key.endswith(("dora_scale", "alpha")) else "low rank": tensor.dtype
              for key, tensor in load_file(saved.path).items()}
    assert dtypes == {"dora_scale": torch.float32, "alpha": torch.float32, "low rank": torch.float16}


def test_api_refuses_dora_on_a_fused_text_encoder_before_anything_runs(a1111, tmp_path):
    """SD2's OpenCLIP text encoder has fused q/k/v: DoRA with the text encoder is a 422 naming
    what to change, before anything is written; DoRA on the UNet alone, or LoRA with the text
    encoder, raise no problem."""
    load_model_as_a1111(a1111.shared, build_tiny_sd2(seed=0))
    client = api_client(a1111)
    images = [base64.b64encode(png_bytes((200, 10, 10))).decode("ascii")]
    request = {"trigger": "sks", "steps": 1, "rank": 4, "alpha": 4.0, "resolution": 64, "preview_every": 0,
               "network": "dora", "train_text_encoder": True, "instance_images": images}
    refused = client.post("/lora-train/v1/train", json=request)
    assert refused.status_code == 422
    assert refused.json()["detail"] == ["DoRA cannot train this text encoder (its q/k/v live in one fused attention "
                                        "layer): turn 'train text encoder' off, or pick another network type"]
    assert not [f for _, _, files in os.walk(a1111.data_path) for f in files]
    model = a1111.shared.sd_model
    assert network_problem(model, TrainConfig(network="dora", train_text_encoder=False)) == ""
    assert network_problem(model, TrainConfig(network="lora", train_text_encoder=True)) == ""
