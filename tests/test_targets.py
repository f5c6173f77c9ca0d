"""Target modules and their kohya names, against tables produced by the real A1111 loader.

Full-size SD1.5/SD2 UNets and text encoders are built on the meta device (no memory, no
weights), so the names and shapes are checked at real scale in about a second.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch import nn

from conftest import GOLDEN
from lora_dreambooth.targets import Target, find_targets, fused_qkv_index

A1111_PATH = "cond_stage_model.wrapped."


# --- stand-ins for the models A1111 holds ------------------------------------------------

def _unet(**kw) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    params = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                  attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                  use_spatial_transformer=True, transformer_depth=1, legacy=False)
    params.update(kw)
    return UNetModel(**params)


def _assemble(unet: nn.Module, te_attr: str, te: nn.Module, wrapped: bool, **embedder_attrs):
    """A LatentDiffusion-shaped module: ``model.diffusion_model`` and ``cond_stage_model``,
    the embedder either plain (ldm) or under ``.wrapped`` (A1111's hijack)."""
    root = nn.Module()
    root.model = nn.Module()
    root.model.diffusion_model = unet
    embedder = nn.Module()
    setattr(embedder, te_attr, te)
    for key, value in embedder_attrs.items():
        setattr(embedder, key, value)
    root.cond_stage_model = nn.Module()
    if wrapped:
        root.cond_stage_model.wrapped = embedder
    else:
        root.cond_stage_model = embedder
    return root


@pytest.fixture(scope="module")
def sd15_parts():
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = _unet(num_heads=8, context_dim=768)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12))
    return unet, clip


@pytest.fixture(scope="module")
def sd2_parts():
    from open_clip.transformer import Transformer
    with torch.device("meta"):
        unet = _unet(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
        text = nn.Module()  # FrozenOpenCLIPEmbedder.model, less what the TE targets ignore
        text.transformer = Transformer(width=1024, layers=24, heads=16)
    return unet, text


def _golden(name: str) -> list[dict]:
    with open(os.path.join(GOLDEN, f"{name}_lora_keys.json"), encoding="utf-8") as f:
        return json.load(f)["entries"]


def _expected(entries: list[dict], network: str, wrapped: bool) -> set[tuple[str, str, str, bool]]:
    out = set()
    for e in entries:
        if network not in e["targets"]:
            continue
        path = e["torch_module_path"]
        if not wrapped:
            path = path.replace(A1111_PATH, "cond_stage_model.")
        out.add((e["kohya"], path, e["part"], e["targets"] == ["locon"]))
    return out


def _got(targets: list[Target]) -> set[tuple[str, str, str, bool]]:
    return {(t.kohya_name, t.path, t.part, t.locon_only) for t in targets}


# --- A1111's name → module mapping, re-implemented from extensions-builtin/Lora/networks.py

_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str, is_sd2: bool) -> str:
    """What A1111 1.10.1's ``convert_diffusers_name_to_compvis`` makes of a kohya name (its
    hard-coded factors assume 2 res blocks per level and no attention on the deepest level)."""
    def suffix(kind: str, rest: str) -> str:
        return _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest

    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return (f"diffusion_model_input_blocks_{1 + 3 * b + j}_"
                f"{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}")
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * j}_{suffix(kind, rest)}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return (f"diffusion_model_output_blocks_{3 * b + j}_"
                f"{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}")
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        b = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * b}_{2 if b > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        i, rest = m[1], m[2]
        if is_sd2:
            rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
            return f"model_transformer_resblocks_{i}_{rest.replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{i}_{rest}"
    return key


@pytest.mark.parametrize("name,is_sd2", [("sd15", False), ("sd2", True)])
def test_a1111_stand_in_matches_the_real_loader(name: str, is_sd2: bool) -> None:
    """The re-implementation above gives the layer name the real A1111 computed."""
    for e in _golden(name):
        assert a1111_compvis_name(e["kohya"], is_sd2) == e["a1111_layer_name"], e["kohya"]


# --- full-size models against the golden tables ------------------------------------------

@pytest.mark.parametrize("wrapped", [True, False], ids=["a1111", "plain"])
@pytest.mark.parametrize("network", ["lora", "locon"])
def test_sd15_matches_golden(sd15_parts, network: str, wrapped: bool) -> None:
    unet, clip = sd15_parts
    model = _assemble(unet, "transformer", clip, wrapped)
    targets = find_targets(model, network, train_text_encoder=True)
    assert _got(targets) == _expected(_golden("sd15"), network, wrapped)
    assert len({t.kohya_name for t in targets}) == len(targets)
    if wrapped:
        shapes = {e["kohya"]: e["weight_shape"] for e in _golden("sd15")}
        for t in targets:
            assert list(model.get_submodule(t.path).weight.shape) == shapes[t.kohya_name]


def test_sd15_counts_and_network_kinds(sd15_parts) -> None:
    unet, clip = sd15_parts
    model = _assemble(unet, "transformer", clip, wrapped=True)
    lora = find_targets(model)
    assert len(lora) == 192 and all(t.part == "unet" and not t.locon_only for t in lora)
    locon = find_targets(model, "locon")
    assert len(locon) == 278 and sum(t.locon_only for t in locon) == 86
    for network in ("loha", "lokr", "dora"):
        assert find_targets(model, network) == locon
    assert len(find_targets(model, "lora", train_text_encoder=True)) == 264
    with pytest.raises(ValueError, match="network type"):
        find_targets(model, "glora")


@pytest.mark.parametrize("wrapped", [True, False], ids=["a1111", "plain"])
@pytest.mark.parametrize("network", ["lora", "locon"])
def test_sd2_matches_golden(sd2_parts, network: str, wrapped: bool) -> None:
    unet, text = sd2_parts
    model = _assemble(unet, "model", text, wrapped, layer_idx=1)  # "penultimate", as SD2
    targets = find_targets(model, network, train_text_encoder=True)
    assert _got(targets) == _expected(_golden("sd2"), network, wrapped)
    assert len({t.kohya_name for t in targets}) == len(targets)
    if wrapped:
        entries = {e["kohya"]: e for e in _golden("sd2")}
        for t in targets:
            e, module = entries[t.kohya_name], model.get_submodule(t.path)
            weight = getattr(module, e.get("weight_param") or "weight")
            assert list(weight.shape) == e["weight_shape"], t.kohya_name
            index = fused_qkv_index(t)
            if e.get("in_proj_rows"):
                d = module.embed_dim
                assert index is not None and [index * d, (index + 1) * d] == e["in_proj_rows"]
            else:
                assert index is None


def test_sd2_text_encoder_layers_follow_layer_idx(sd2_parts) -> None:
    unet, text = sd2_parts
    last = _assemble(unet, "model", text, True, layer_idx=0)
    penultimate = _assemble(unet, "model", text, True, layer_idx=1)
    te_last = [t for t in find_targets(last, train_text_encoder=True) if t.part == "te"]
    te_pen = [t for t in find_targets(penultimate, train_text_encoder=True) if t.part == "te"]
    assert len(te_last) == 24 * 6 and len(te_pen) == 23 * 6
    assert not any("_layers_23_" in t.kohya_name for t in te_pen)


def test_sdxl_is_refused(sd15_parts) -> None:
    model = _assemble(sd15_parts[0], "transformer", sd15_parts[1], True)
    model.conditioner = nn.Module()
    with pytest.raises(NotImplementedError, match="SDXL"):
        find_targets(model)


# --- the tiny ldm model the other tests train ----------------------------------------------

@pytest.mark.parametrize("network", ["lora", "locon"])
def test_tiny_targets_resolve_and_round_trip_through_a1111(tiny_sd1, network: str) -> None:
    targets = find_targets(tiny_sd1, network, train_text_encoder=True)
    assert len({t.kohya_name for t in targets}) == len(targets)
    assert len({t.path for t in targets}) == len(targets)
    assert {t.part for t in targets} == {"unet", "te"}
    mismatched = set()
    for t in targets:
        module = tiny_sd1.get_submodule(t.path)
        assert isinstance(module, (nn.Linear, nn.Conv2d)), t.path
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            assert t.locon_only, t.path
        # A1111 names modules by their path under sd_model.model / cond_stage_model.wrapped.
        prefix = "model." if t.part == "unet" else "cond_stage_model."
        assert t.path.startswith(prefix)
        if a1111_compvis_name(t.kohya_name, is_sd2=False) != t.path[len(prefix):].replace(".", "_"):
            mismatched.add(t.kohya_name)
    assert mismatched == set()
