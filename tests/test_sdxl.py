"""SDXL: target names against the table the real A1111 loader produced (full size, meta
device), and the tiny SDXL stand-in (ldm blocks shaped and named like sgm's) conditioned,
trained and restored exactly as the engine does it on the model A1111 holds."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import GOLDEN, ROUNDING
from lora_dreambooth.data import MicroBatch
from lora_dreambooth.model import SdxlBackend, UnsupportedModelError, make_backend
from lora_dreambooth.targets import Target, find_targets, fused_qkv_index
from tiny_models import build_tiny_sdxl, sdxl_unet

PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _golden() -> list[dict]:
    with open(os.path.join(GOLDEN, "sdxl_lora_keys.json"), encoding="utf-8") as f:
        return json.load(f)["entries"]


class A1111Embedder(nn.Module):
    """The shape of A1111's FrozenCLIPEmbedderForSDXLWithCustomWords /
    FrozenOpenCLIPEmbedder2WithCustomWords: the sgm embedder is ``.wrapped``, the wrapper is
    called with the prompts and keeps the embedder's conditioner attributes."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        for attr in ("input_key", "is_trainable", "ucg_rate", "legacy_ucg_val"):
            setattr(self, attr, getattr(wrapped, attr, None))

    def forward(self, prompts):
        return self.wrapped(prompts)


def a1111_hijack(model: nn.Module) -> nn.Module:
    """What A1111's sd_hijack does to an SDXL model: wrap both text embedders and make the
    conditioner the model's ``cond_stage_model`` too."""
    for i in (0, 1):
        model.conditioner.embedders[i] = A1111Embedder(model.conditioner.embedders[i])
    model.cond_stage_model = model.conditioner
    return model


class SdConditioning(list):
    """A1111's prompt_parser.SdConditioning: prompts that carry the image size."""

    def __init__(self, prompts, width=None, height=None, is_negative_prompt=False):
        super().__init__(prompts)
        self.width, self.height, self.is_negative_prompt = width, height, is_negative_prompt


# --- full size against the golden table -----------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_parts():
    from open_clip.transformer import Transformer
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = sdxl_unet()  # SDXL base: 320 channels, mult (1, 2, 4), depth (0, 2, 10), 2048 context
        te1 = nn.Module()
        te1.transformer = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                       num_hidden_layers=12, num_attention_heads=12))
        te2 = nn.Module()
        te2.model = nn.Module()
        te2.model.transformer = Transformer(width=1280, layers=32, heads=20)  # OpenCLIP bigG text
    return unet, te1, te2


def _assemble(parts, wrapped: bool) -> nn.Module:
    unet, te1, te2 = parts
    root = nn.Module()
    root.is_sdxl = True
    root.model = nn.Module()
    root.model.diffusion_model = unet
    root.conditioner = nn.Module()
    embedders = [te1, te2] + [nn.Module() for _ in range(3)]  # size embedders: no weights
    if wrapped:
        embedders[:2] = [A1111Embedder(te1), A1111Embedder(te2)]
    root.conditioner.embedders = nn.ModuleList(embedders)
    return root


def _key(t: Target) -> tuple[str, str, bool]:
    return t.kohya_name, t.path, t.locon_only


@pytest.mark.parametrize("wrapped", [True, False], ids=["a1111", "plain"])
@pytest.mark.parametrize("network", ["lora", "locon"])
def test_sdxl_matches_golden(sdxl_parts, network: str, wrapped: bool) -> None:
    model = _assemble(sdxl_parts, wrapped)
    targets = find_targets(model, network, train_text_encoder=True)
    def path(e: dict) -> str:
        return e["torch_module_path"] if wrapped else e["torch_module_path"].replace(".wrapped.", ".")

    expected = {(e["kohya"], path(e), e["targets"] == ["locon"]) for e in _golden() if network in e["targets"]}
    assert {_key(t) for t in targets} == expected
    assert len(targets) == len(expected) == (1052 if network == "locon" else 986)
    parts = {e["kohya"]: e["part"] for e in _golden()}
    assert all(t.part == ("unet" if parts[t.kohya_name] == "unet" else "te") for t in targets)
    entries = {e["kohya"]: e for e in _golden()}
    for t in targets:
        e, module = entries[t.kohya_name], model.get_submodule(t.path)
        assert list(getattr(module, e["weight_param"]).shape) == e["weight_shape"], t.kohya_name
        index = fused_qkv_index(t)
        if e.get("in_proj_rows"):
            assert index is not None and [index * 1280, (index + 1) * 1280] == e["in_proj_rows"]
        else:
            assert index is None


def test_sdxl_unet_only_and_non_base_models_refused(sdxl_parts) -> None:
    model = _assemble(sdxl_parts, wrapped=True)
    unet_only = find_targets(model, "lora")
    assert len(unet_only) == 722 and all(t.part == "unet" for t in unet_only)
    model.conditioner.embedders = nn.ModuleList(list(model.conditioner.embedders)[1:])  # refiner-like
    with pytest.raises(NotImplementedError, match="SDXL base"):
        find_targets(model)


# --- the tiny stand-in ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def _pristine(tiny_clip_dir):
    return build_tiny_sdxl(seed=0, clip_dir=tiny_clip_dir)


@pytest.fixture()
def sdxl(_pristine):
    """A fresh tiny SDXL DiffusionEngine (fp32, eval) for each test: tests may change it."""
    return copy.deepcopy(_pristine)


def test_tiny_stand_in_has_the_golden_layout(sdxl) -> None:
    """Every kohya name and module path of the tiny model is the real one's, for the layers it
    has (transformer block 0 of each transformer, text-encoder layers 0 and 1)."""
    assert (sdxl.is_sd1, sdxl.is_sd2, sdxl.is_sdxl) == (False, False, True)
    assert sdxl.parameterization == "eps" and sdxl.scale_factor == 0.13025 and not sdxl.training
    assert sum(p.numel() for p in sdxl.parameters()) < 7e6

    def kept(e: dict) -> bool:
        name = e["kohya"]
        if "_transformer_blocks_" in name:
            return "_transformer_blocks_0_" in name
        if name.startswith("lora_te"):
            return int(name.split("_layers_")[1].split("_")[0]) < 2
        return True

    expected = {(e["kohya"], e["torch_module_path"].replace(".wrapped.", "."), e["targets"] == ["locon"])
                for e in _golden() if kept(e)}
    assert {_key(t) for t in find_targets(sdxl, "locon", train_text_encoder=True)} == expected


def test_conditioning_is_a1111s_and_follows_size_and_crop(sdxl) -> None:
    backend = make_backend(sdxl)
    assert isinstance(backend, SdxlBackend) and backend.sd_version == "sdxl"
    prompts = ["a photo of wpg", ""]
    with torch.no_grad():
        cond = sdxl.get_learned_conditioning(prompts)
        ours = backend.encode_prompts(prompts)
    assert cond["crossattn"].shape == (2, 77, 64) and cond["vector"].shape == (2, 128)
    assert all(torch.equal(cond[k], ours[k]) for k in ("crossattn", "vector"))
    assert cond["crossattn"][1].any()  # "" as a training caption: encoded (sgm's default)

    pooled = 32  # te2 width: the first columns of vector
    with torch.no_grad():
        sized = sdxl.get_learned_conditioning(SdConditioning(prompts, width=512, height=768))
        negative = sdxl.get_learned_conditioning(SdConditioning([""], is_negative_prompt=True))
        ours_negative = backend.encode_prompts([""], negative=True)
    assert torch.equal(sized["vector"][:, :pooled], cond["vector"][:, :pooled])
    assert not torch.equal(sized["vector"][:, pooled:], cond["vector"][:, pooled:])
    for c in (negative, ours_negative):  # A1111's empty negative prompt: text parts zero
        assert not c["crossattn"].any() and not c["vector"][:, :pooled].any()
        assert c["vector"][:, pooled:].any()

    def batch(original, crop, target=(1024, 1024)) -> MicroBatch:
        return MicroBatch(None, None, prompts[:1], torch.tensor([False]), [original], [crop], target)

    with torch.no_grad():
        one = backend.encode_prompts(prompts[:1])
        same = backend.conditioning(one, batch((1024, 1024), (0, 0)))
        moved = backend.conditioning(one, batch((1024, 1024), (16, 0)))
        larger = backend.conditioning(one, batch((2048, 1024), (0, 0)))
        a1111 = sdxl.get_learned_conditioning(SdConditioning(prompts[:1], width=512, height=768))
        as_a1111 = backend.conditioning(one, batch((768, 512), (0, 0), (768, 512)))
    assert torch.equal(same["vector"], one["vector"]) and torch.equal(same["crossattn"], one["crossattn"])
    for other in (moved, larger):
        assert torch.equal(other["vector"][:, :pooled], one["vector"][:, :pooled])
        assert not torch.equal(other["vector"][:, pooled:], one["vector"][:, pooled:])
    torch.testing.assert_close(as_a1111["vector"], a1111["vector"], **ROUNDING)  # two code paths


def test_latents_schedule_and_refusals(sdxl) -> None:
    backend = make_backend(sdxl)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    ours = backend.latents_from_moments(backend.encode_moments(pixels), torch.Generator().manual_seed(7))
    torch.manual_seed(7)  # the VAE samples its posterior from the global RNG
    reference = sdxl.get_first_stage_encoding(sdxl.encode_first_stage(pixels))
    assert torch.allclose(ours, reference, atol=1e-6)
    scheduler = backend.training_scheduler()
    assert torch.allclose(scheduler.alphas_cumprod, sdxl.alphas_cumprod, atol=1e-6)
    assert scheduler.config.prediction_type == "epsilon"
    sdxl.conditioner.embedders[2].input_key = "aesthetic_score"  # a refiner's conditioner
    with pytest.raises(UnsupportedModelError, match="SDXL base"):
        make_backend(sdxl)


def test_gradient_checkpointing_gives_the_same_gradients(sdxl) -> None:
    backend = make_backend(sdxl)
    with torch.no_grad():
        cond = backend.encode_prompts(["a photo"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    unet = sdxl.model.diffusion_model
    weights = [unet.input_blocks[4][0].in_layers[2].weight,
               unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.weight, unet.label_emb[0][0].weight]

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        for w in weights:
            w.grad = None
        with backend.gradient_checkpointing(checkpointing):
            backend.predict(x, t, cond).square().mean().backward()
        return [w.grad.clone() for w in weights]

    plain, checkpointed = grads(False), grads(True)
    assert all(g.any() and torch.allclose(g, c, atol=1e-6) for g, c in zip(plain, checkpointed))
    assert all("forward" not in vars(m) for m in sdxl.modules())


# --- end to end -----------------------------------------------------------------------------

def _train(model, tmp_path, **changes):
    from lora_dreambooth.config import TrainConfig
    from lora_dreambooth.demo import draw_character, write_images
    from lora_dreambooth.train import train_lora

    values = dict(trigger="wpg", instance_dir=write_images(str(tmp_path / "images"), draw_character, 2),
                  steps=2, resolution=64, rank=4, alpha=4.0, learning_rate=1e-3, text_encoder_lr=1e-3,
                  save_dtype="fp32")
    values.update(changes)
    return train_lora(model, TrainConfig(**values), str(tmp_path / "lora"), str(tmp_path / "run"))


def test_trains_with_frozen_text_encoders_on_each_images_size(sdxl, tmp_path, monkeypatch) -> None:
    """Cached text conditioning + per-sample sizes give what A1111 computes for that image
    size; the model comes back bit-identical and the file is tagged SDXL."""
    from lora_dreambooth.guard import state_hash

    seen = []
    original = SdxlBackend.conditioning

    def recording(self, cond, batch):
        out = original(self, cond, batch)
        seen.append((list(batch.prompts), batch.original_sizes, batch.crops, batch.target_size, out))
        return out

    monkeypatch.setattr(SdxlBackend, "conditioning", recording)
    before = state_hash(sdxl)
    result = _train(sdxl, tmp_path, preview_every=2, preview_steps=2)
    assert state_hash(sdxl) == before
    assert len(seen) == 2 and all(s[1] == [(64, 64)] and s[2] == [(0, 0)] and s[3] == (64, 64) for s in seen)
    with torch.no_grad():
        expected = sdxl.get_learned_conditioning(SdConditioning(seen[0][0], width=64, height=64))
    assert torch.allclose(seen[0][4]["vector"], expected["vector"], atol=1e-6)
    assert torch.allclose(seen[0][4]["crossattn"], expected["crossattn"], atol=1e-6)

    with safe_open(result.path, "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert json.load(open(result.sidecar_path))["sd version"] == "SDXL"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert not any(k.startswith("lora_te") for k in keys) and len(result.previews) == 1


def test_trains_both_text_encoders_as_a1111_wraps_them(sdxl, tmp_path) -> None:
    """te1 and te2 adapters under A1111's wrapped embedders: restored bit-identically, and
    every text-encoder layer carries the complete q/k/v/out set A1111 needs (te2's fused
    attention is applied only when all four are there)."""
    from safetensors.torch import load_file

    from lora_dreambooth.guard import state_hash

    model = a1111_hijack(sdxl)
    before = state_hash(model)
    result = _train(model, tmp_path, train_text_encoder=True)
    assert state_hash(model) == before
    tensors = load_file(result.path)
    for te in ("te1", "te2"):
        for layer in (0, 1):
            base = f"lora_{te}_text_model_encoder_layers_{layer}_"
            for part in PARTS:
                assert f"{base}self_attn_{part}.lora_down.weight" in tensors
            assert f"{base}mlp_fc1.alpha" in tensors and f"{base}mlp_fc2.alpha" in tensors
    assert tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].any()
    assert tensors["lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight"].any()  # pooled
    # te1's last layer feeds nothing (the conditioning reads its penultimate): kohya adapts it
    # anyway, and its adapter stays a zero delta.
    assert not tensors["lora_te1_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight"].any()
