"""The tiny SD2-layout model: real ldm + OpenCLIP code, random weights, nothing downloaded."""
from __future__ import annotations

import socket

import pytest
import torch

from lora_dreambooth.model import LdmBackend
from lora_dreambooth.targets import find_targets, fused_qkv_index
from tiny_models import build_tiny_sd2


@pytest.fixture(scope="module")
def sd2():
    return build_tiny_sd2(seed=0)


def test_builds_without_touching_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tiny SD2 model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = build_tiny_sd2(seed=1, parameterization="eps")
    assert model.parameterization == "eps"


def test_is_an_sd2_v_model(sd2):
    assert sd2.parameterization == "v"
    assert (sd2.is_sd1, sd2.is_sd2, sd2.is_sdxl) == (False, True, False)
    assert not sd2.training
    backend = LdmBackend(sd2)
    assert backend.family == "sd2"
    assert backend.training_scheduler().config.prediction_type == "v_prediction"
    assert type(sd2.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder"
    assert sd2.cond_stage_model.layer == "penultimate"


def test_conditioning_and_denoiser(sd2):
    with torch.no_grad():
        cond = sd2.get_learned_conditioning(["a photo", ""])
        assert cond.shape == (2, 77, 32)
        assert not torch.equal(cond[0], cond[1])
        out = sd2.apply_model(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), cond)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 0


def test_unet_has_the_sd2_transformer_layout(sd2):
    transformers = [m for m in sd2.model.diffusion_model.modules()
                    if type(m).__name__ == "SpatialTransformer"]
    assert transformers
    for st in transformers:
        assert isinstance(st.proj_in, torch.nn.Linear) and isinstance(st.proj_out, torch.nn.Linear)
        assert st.proj_out.weight.any()  # ldm's zero init was replaced
        attn = st.transformer_blocks[0].attn2
        assert attn.to_k.in_features == 32  # context_dim is the text width
        assert attn.to_q.out_features // attn.heads == 16  # SD2: fixed head width


def test_find_targets_gives_fused_text_encoder_targets(sd2):
    targets = find_targets(sd2, "lora", train_text_encoder=True)
    te = [t for t in targets if t.part == "te"]
    layers = len(sd2.cond_stage_model.model.transformer.resblocks)
    assert len(te) == 6 * (layers - 1)  # penultimate: the last layer is not a target
    for i in range(layers - 1):
        base = f"lora_te_text_model_encoder_layers_{i}_self_attn_"
        attn_path = f"cond_stage_model.model.transformer.resblocks.{i}.attn"
        by_name = {t.kohya_name: t for t in te}
        for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
            target = by_name[base + part]
            assert target.path == attn_path and fused_qkv_index(target) == index
        out = by_name[base + "out_proj"]
        assert out.path == attn_path + ".out_proj" and fused_qkv_index(out) is None
        assert isinstance(sd2.get_submodule(attn_path), torch.nn.MultiheadAttention)
    assert any(t.part == "unet" for t in targets)


def test_sd2_trains_end_to_end_with_its_text_encoder(tmp_path) -> None:
    """A v-prediction SD2 run: restored bit-identically, SD2 metadata, and every text-encoder
    layer carries the complete q/k/v/out set A1111 needs to apply the fused attention."""
    import json

    from safetensors import safe_open

    from lora_dreambooth.config import TrainConfig
    from lora_dreambooth.demo import draw_character, write_images
    from lora_dreambooth.guard import state_hash
    from lora_dreambooth.train import train_lora

    model = build_tiny_sd2()
    before = state_hash(model)
    config = TrainConfig(trigger="wpg", instance_dir=write_images(str(tmp_path / "images"), draw_character, 2),
                         steps=2, resolution=64, rank=4, alpha=4.0, train_text_encoder=True)
    result = train_lora(model, config, str(tmp_path / "lora"), str(tmp_path / "run"))
    assert state_hash(model) == before
    with safe_open(result.path, "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2"
    assert "768-v" in metadata["modelspec.architecture"]
    assert json.load(open(result.sidecar_path))["sd version"] == "SD2"
    layers = {k.split("_self_attn_")[0] for k in keys if "_self_attn_" in k}
    assert layers
    for layer in layers:
        for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"{layer}_self_attn_{part}.lora_down.weight" in keys
