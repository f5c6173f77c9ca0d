"""The exported file is what A1111 applies, exactly.

First the stand-in for A1111's loader (``a1111_lora.py``) is proven against every case of the
golden table produced by the real A1111 1.10.1 loader. Then, on the tiny ldm model, what each
peft adapter computes is compared with what that stand-in computes from our exported tensors.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from a1111_lora import a1111_delta, assert_a1111_exact, file_weights
from conftest import GOLDEN
from lora_dreambooth.adapters import inject
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.export import (ExportResult, addnet_hash, atomic_write, kohya_tensors, save_lora,
                                    unique_name)
from lora_dreambooth.guard import state_hash
from lora_dreambooth.targets import find_targets

GOLDEN_APPLY = os.path.join(GOLDEN, "a1111_apply.safetensors")

#: Roles of targets, each the first of find_targets' list that fits (shapes in the tiny model).
ROLES = {
    "to_q": lambda path, m: path.endswith("attn1.to_q"),
    "cross_k": lambda path, m: path.endswith("attn2.to_k"),  # context 32 → inner width
    "ff_out": lambda path, m: path.endswith("ff.net.2"),  # 4× width → width
    "proj_in": lambda path, m: path.endswith("proj_in"),  # conv 1×1
    "skip": lambda path, m: path.endswith("skip_connection"),  # conv 1×1 in a ResBlock
    "conv3": lambda path, m: path.endswith("in_layers.2") and m.in_channels != m.out_channels,
    "down": lambda path, m: path.endswith(".op"),  # conv 3×3, stride 2
    "te_q": lambda path, m: path.endswith("self_attn.q_proj"),
}
TO_Q, CROSS_K, FF_OUT, PROJ_IN, SKIP, CONV3, DOWN, TE_Q = ROLES


# --- the stand-in against the real loader -------------------------------------------------

def _golden_cases() -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    with safe_open(GOLDEN_APPLY, "pt") as f:
        info = json.loads(f.metadata()["golden"])
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key in f.keys():
            case, rest = key.split(".", 1)
            tensors.setdefault(case, {})[rest] = f.get_tensor(key)
    return info, tensors


def test_stand_in_reproduces_every_golden_case():
    info, tensors = _golden_cases()
    assert info["a1111_version"] == "v1.10.1" and info["multiplier"] == 1.0
    assert set(info["cases"]) == set(tensors) and len(tensors) == 16
    # DoRA's per-input-column rule (case08 Linear, case08b Conv 3×3) is among them.
    assert sorted(case for case, t in tensors.items() if "w.dora_scale" in t) == ["case08", "case08b"]
    for case, t in tensors.items():
        weights = {k[2:]: v for k, v in t.items() if k.startswith("w.")}
        assert set(weights) == set(info["cases"][case]["keys_in_lora_file"]), case
        delta = a1111_delta(weights, t["base_weight"])
        expected = t["delta"]
        assert delta.shape == expected.shape, case
        assert _rel(delta, expected) <= 1e-5, f"{case}: {info['cases'][case]['desc']}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- peft adapters vs A1111 on the tiny model ---------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_clip_dir):
    from lora_dreambooth.tiny import build_tiny_sd1
    return build_tiny_sd1(seed=0, clip_dir=tiny_clip_dir)


def _targets(model, roles: list[str]):
    every = find_targets(model, "locon", train_text_encoder=True)
    return [next(t for t in every if ROLES[role](t.path, model.get_submodule(t.path))) for role in roles]


def _randomise(adapters, seed: int = 0) -> None:
    """Adapters start with a zero delta (LoRA's up, LoHa's w2_b, LoKr's w1 are zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in ("unet", "te"):
            for p in adapters.parameters_for(part):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


EXACT_CASES = {
    "lora": (dict(rank=4, alpha=2.0), [TO_Q, CROSS_K, FF_OUT, PROJ_IN, SKIP, TE_Q]),
    "locon": (dict(rank=4, alpha=8.0, conv_rank=3, conv_alpha=1.5), [CONV3, DOWN, PROJ_IN, TO_Q]),
    "loha": (dict(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0), [TO_Q, FF_OUT, PROJ_IN, CONV3, DOWN, TE_Q]),
    # rank 8 ≥ half the factor sizes: full lokr_w2 (A1111 ignores alpha) ...
    "lokr-full": (dict(rank=8, alpha=2.0, conv_rank=16, conv_alpha=4.0), [TO_Q, FF_OUT, PROJ_IN, CONV3, DOWN]),
    # ... rank 1-2: decomposed lokr_w2_a/_b (A1111 applies alpha/rank).
    "lokr-decomposed": (dict(rank=2, alpha=7.0, conv_rank=1, conv_alpha=5.0), [TO_Q, FF_OUT, PROJ_IN, CONV3, DOWN]),
    "dora": (dict(rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5), [TO_Q, CROSS_K, FF_OUT, PROJ_IN, SKIP, CONV3, DOWN,
                                                                   TE_Q]),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exported_tensors_are_exact_in_a1111(model, case):
    hyper, roles = EXACT_CASES[case]
    network = case.split("-")[0]
    before = state_hash(model)
    adapters = inject(model, _targets(model, roles), TrainConfig(network=network, **hyper))
    try:
        _randomise(adapters)
        tensors = kohya_tensors(adapters, dtype=torch.float32)
        if case == "lokr-full":
            assert not any(k.endswith(("_a", "_b")) for k in tensors)
        if case == "lokr-decomposed":
            assert sum(k.endswith("lokr_w2_b") for k in tensors) == len(roles)
        assert_a1111_exact(adapters, tensors)
    finally:
        adapters.remove()
    assert state_hash(model) == before


def test_key_names_and_shapes(model):
    adapters = inject(model, _targets(model, [TO_Q, PROJ_IN, CONV3]),
                      TrainConfig(network="locon", rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.0))
    try:
        tensors = kohya_tensors(adapters)
    finally:
        adapters.remove()
    q, proj, conv = (t.kohya_name for t in adapters.targets)
    (qo, qi), (po, pi, _, _), (co, ci, _, _) = (tuple(layer.base.weight.shape) for layer in adapters.layers)
    assert q == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert ci != co
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"{q}.lora_down.weight": (4, qi), f"{q}.lora_up.weight": (qo, 4), f"{q}.alpha": (),
        f"{proj}.lora_down.weight": (4, pi, 1, 1), f"{proj}.lora_up.weight": (po, 4, 1, 1), f"{proj}.alpha": (),
        f"{conv}.lora_down.weight": (3, ci, 3, 3), f"{conv}.lora_up.weight": (co, 3, 1, 1), f"{conv}.alpha": (),
    }
    assert tensors[f"{q}.alpha"].item() == 2.0 and tensors[f"{conv}.alpha"].item() == 1.0
    assert tensors[f"{q}.lora_up.weight"].dtype == torch.float16  # the default


# --- the file ------------------------------------------------------------------------------

def _config(**kw) -> TrainConfig:
    values = dict(trigger="ohwx", name="my lora", network="lora", rank=4, alpha=2.0, steps=300,
                  learning_rate=2e-4, resolution=512, comment="hello")
    values.update(kw)
    return TrainConfig(**values)


def _save(model, folder, config: TrainConfig, roles=(TO_Q, PROJ_IN, TE_Q), **kw) -> ExportResult:
    adapters = inject(model, _targets(model, list(roles)), config)
    try:
        _randomise(adapters)
        args = dict(sd_version="SD1", steps_done=250, num_train_images=5,
                    tag_frequency={"5_ohwx": {"ohwx": 5}})
        args.update(kw)
        return save_lora(adapters, config, str(folder), **args)
    finally:
        adapters.remove()


def _metadata(path: str) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_file_metadata_hash_and_sidecar(model, tmp_path):
    result = _save(model, tmp_path, _config())
    assert result == ExportResult(str(tmp_path / "my lora.safetensors"), str(tmp_path / "my lora.json"), "my lora")
    meta = _metadata(result.path)
    assert all(isinstance(v, str) for v in meta.values())
    expected = {
        "ss_output_name": "my lora", "ss_network_module": "networks.lora", "ss_network_dim": "4",
        "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v1", "ss_v2": "False",
        "ss_resolution": "(512, 512)", "ss_num_train_images": "5", "ss_steps": "250",
        "ss_learning_rate": "0.0002", "ss_unet_lr": "0.0002", "ss_text_encoder_lr": "0.0",
        "ss_training_comment": "hello", "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "my lora",
        "modelspec.trigger_phrase": "ohwx", "modelspec.resolution": "512x512",
        "modelspec.implementation": "diffusers",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert json.loads(meta["ss_tag_frequency"]) == {"5_ohwx": {"ohwx": 5}}
    assert "ss_network_args" not in meta and "ssmd_cover_images" not in meta
    assert meta["modelspec.date"][:4].isdigit() and "T" in meta["modelspec.date"]

    # sshs_model_hash is the sha256 of the bytes after the header, recomputed here from scratch
    raw = open(result.path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + n])["__metadata__"]["sshs_model_hash"] == meta["sshs_model_hash"]
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest() == addnet_hash(result.path)

    tensors = load_file(result.path)
    assert not any("lora_A" in k or "lora_B" in k for k in tensors)
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if not k.endswith(".alpha"))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)

    sidecar = json.load(open(result.sidecar_path, encoding="utf-8"))
    assert set(sidecar) == {"description", "sd version", "activation text", "preferred weight",
                            "negative text", "notes"}
    assert sidecar["sd version"] == "SD1" and sidecar["activation text"] == "ohwx"
    assert sidecar["preferred weight"] == 1.0 and isinstance(sidecar["preferred weight"], float)
    assert "rank 4" in sidecar["notes"] and "250 of 300 steps" in sidecar["notes"]
    assert sorted(os.listdir(tmp_path)) == ["my lora.json", "my lora.safetensors"]  # no temp files


def test_file_round_trip_is_exact(model, tmp_path):
    """fp32 file → stand-in A1111 math → same output as the adapter that was trained."""
    config = _config(network="loha", conv_rank=2, conv_alpha=1.0, save_dtype="fp32")
    adapters = inject(model, _targets(model, [TO_Q, CONV3, TE_Q]), config)
    try:
        _randomise(adapters, seed=3)
        result = save_lora(adapters, config, str(tmp_path), sd_version="sd2", steps_done=1,
                           num_train_images=1, tag_frequency={})
        assert_a1111_exact(adapters, load_file(result.path))
    finally:
        adapters.remove()
    meta = _metadata(result.path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "1.0"}
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2", "True")
    assert json.load(open(result.sidecar_path))["sd version"] == "SD2"


def test_lokr_file_alpha_is_the_rank(model, tmp_path):
    result = _save(model, tmp_path, _config(network="lokr", rank=2, alpha=7.0), roles=[TO_Q])
    tensors = load_file(result.path)
    assert [v.item() for k, v in tensors.items() if k.endswith(".alpha")] == [2.0]
    assert _metadata(result.path)["ss_network_alpha"] == "2.0"


def test_names_are_never_reused_unless_overwrite(model, tmp_path):
    first = _save(model, tmp_path, _config(name="face"))
    first_bytes = open(first.path, "rb").read()
    second = _save(model, tmp_path, _config(name="face"))
    third = _save(model, tmp_path, _config(name="face"))
    assert [r.name for r in (first, second, third)] == ["face", "face-1", "face-2"]
    assert third.sidecar_path == str(tmp_path / "face-2.json")
    assert _metadata(third.path)["ss_output_name"] == "face-2" == _metadata(third.path)["modelspec.title"]
    assert open(first.path, "rb").read() == first_bytes
    again = _save(model, tmp_path, _config(name="face", overwrite=True, rank=2))
    assert again.name == "face" and _metadata(again.path)["ss_network_dim"] == "2"
    assert len(os.listdir(tmp_path)) == 6


def test_unique_name(tmp_path):
    assert unique_name(str(tmp_path), "x", False) == "x"
    (tmp_path / "x.safetensors").write_bytes(b"")
    (tmp_path / "x-1.json").write_text("{}")  # an orphan sidecar also takes the name
    assert unique_name(str(tmp_path), "x", False) == "x-2"
    assert unique_name(str(tmp_path), "x", True) == "x"


def test_cover_image_round_trips(model, tmp_path):
    cover = Image.new("RGB", (16, 12), (200, 30, 90))
    cover.putpixel((3, 4), (1, 2, 3))
    result = _save(model, tmp_path, _config(), cover_image=cover,
                   extra_metadata={"ss_sd_model_name": "v1-5", "ss_output_name": "not this"})
    meta = _metadata(result.path)
    images = json.loads(meta["ssmd_cover_images"])
    assert len(images) == 1
    decoded = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert decoded.format == "PNG" and list(decoded.convert("RGB").getdata()) == list(cover.getdata())
    assert meta["ss_sd_model_name"] == "v1-5" and meta["ss_output_name"] == "my lora"
    assert meta["sshs_model_hash"] == addnet_hash(result.path)


def test_atomic_write_never_leaves_partial_or_temp_files(tmp_path):
    path = str(tmp_path / "a.safetensors")

    def write(content: bytes):
        def _write(temp: str) -> None:
            assert os.path.dirname(temp) == str(tmp_path) and temp != path
            with open(temp, "wb") as f:
                f.write(content)
        return _write

    def failing(temp: str) -> None:
        with open(temp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, failing)
    assert os.listdir(tmp_path) == []
    atomic_write(path, write(b"old"))
    with pytest.raises(OSError):
        atomic_write(path, failing)
    assert os.listdir(tmp_path) == ["a.safetensors"] and open(path, "rb").read() == b"old"
    atomic_write(path, write(b"new"))
    assert os.listdir(tmp_path) == ["a.safetensors"] and open(path, "rb").read() == b"new"


@pytest.mark.parametrize("network", ["lora", "loha", "lokr"])
def test_sd2_fused_text_encoder_is_exact_in_a1111(network):
    """SD2's OpenCLIP attention: A1111 adds cat(Δq, Δk, Δv) to in_proj_weight and Δout to
    out_proj.weight, each Δ computed from our q/k/v/out_proj tensors like any Linear's."""
    from lora_dreambooth.fused_attention import PARTS, FusedSlice
    from tiny_models import build_tiny_sd2
    model = build_tiny_sd2(seed=0)
    before = state_hash(model)
    prompts = ["a photo of sks", ""]
    with torch.no_grad():
        base_cond = model.get_learned_conditioning(prompts)
    targets = find_targets(model, network, train_text_encoder=True)
    adapters = inject(model, targets, TrainConfig(network=network, rank=4, alpha=2.0, conv_rank=2,
                                                  conv_alpha=1.0, save_dtype="fp32"))
    try:
        assert [layer.target for layer in adapters.layers] == targets
        _randomise(adapters)
        tensors = kohya_tensors(adapters, torch.float32)
        with torch.no_grad():
            adapted_cond = model.get_learned_conditioning(prompts)
    finally:
        adapters.remove()
    assert state_hash(model) == before
    with torch.no_grad():  # add A1111's deltas to the text encoder's weights, then undo
        backups = []
        for layer in adapters.layers:
            if layer.target.part != "te":
                continue
            if isinstance(layer, FusedSlice):
                part = PARTS.index(layer.target.kohya_name.rsplit("_self_attn_", 1)[1])
                d = layer.attention.embed_dim
                w = (layer.attention.out_proj.weight if part == 3
                     else layer.attention.in_proj_weight[part * d:(part + 1) * d])
            else:
                w = layer.base.weight
            backups.append((w, w.clone()))
            w += a1111_delta(file_weights(tensors, layer.target.kohya_name), w)
        assert any(isinstance(layer, FusedSlice) for layer in adapters.layers)
        merged_cond = model.get_learned_conditioning(prompts)
        for w, saved in backups:
            w.copy_(saved)
    assert state_hash(model) == before
    contribution = (adapted_cond - base_cond).norm()
    assert contribution > 1e-3 * base_cond.norm()
    assert ((adapted_cond - merged_cond).norm() / contribution).item() <= 1e-4
