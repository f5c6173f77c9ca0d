"""Adapters on a fused nn.MultiheadAttention (SD2's OpenCLIP text encoder) train exactly what
A1111 applies from the exported q/k/v/out_proj tensors, and come out without a trace."""
from __future__ import annotations

import copy
import functools
import hashlib

import pytest
import torch
from torch import nn

from a1111_lora import a1111_delta, file_weights
from conftest import LOW_PRECISION_BASES
from lora_dreambooth import networks
from lora_dreambooth.adapters import Adapters, create_layer, inject
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.export import kohya_tensors
from lora_dreambooth.fused_attention import (PARTS, FusedAttentionAdapter, adapt_fused_attention,
                                             split_fused_targets)
from lora_dreambooth.targets import Target, find_targets
from tiny_models import build_tiny_sd2

#: Every registered type that trains fused attention (DoRA is refused there, see below).
NETWORKS = tuple(name for name in networks.NAMES if networks.get(name).fused_attention)
RANK, ALPHA = 4, 2.0


def _wrapper(network: str, rank: int = RANK, alpha: float = ALPHA):
    """The network type's peft Linear layer, built as ``adapters.inject`` builds it."""
    return functools.partial(create_layer, network=networks.get(network), rank=rank, alpha=alpha)


def _state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _randomise(params: list[nn.Parameter], seed: int = 0, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _standalone(batch_first: bool, seed: int = 0) -> nn.MultiheadAttention:
    """Frozen and in eval mode, as ldm holds the text encoder."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval().requires_grad_(False)
    with torch.no_grad():  # nn.MultiheadAttention zero-initialises the biases
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha


def _held(batch_first: bool) -> nn.Module:
    """``model.block.attn``: the attention where targets put it (path ``block.attn``)."""
    model = nn.Module()
    model.block = nn.Module()
    model.block.attn = _standalone(batch_first)
    return model


def _calls(batch_first: bool):
    """(args, kwargs) the attention is called with: OpenCLIP's (causal float mask, no weights)
    and a cross-attention with a padding mask that returns averaged weights."""
    gen = torch.Generator().manual_seed(3)
    shape = (2, 7, 32) if batch_first else (7, 2, 32)
    x = torch.randn(shape, generator=gen)
    kv = torch.randn((2, 5, 32) if batch_first else (5, 2, 32), generator=gen)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    return [((x, x, x), dict(need_weights=False, attn_mask=causal)),
            ((x, kv, kv), dict(key_padding_mask=padding))]


# --- the rule A1111 1.10.1 applies to a MultiheadAttention --------------------------------

def a1111_attention(mha: nn.MultiheadAttention, tensors: dict[str, torch.Tensor],
                    kohya_layer: str) -> nn.MultiheadAttention:
    """A copy of ``mha`` with the weights A1111 computes: only when q, k, v AND out_proj are
    all in the file, ``in_proj_weight += cat(Δq, Δk, Δv)`` and ``out_proj.weight += Δout``
    (each Δ from the part's own tensors, against that part's weight)."""
    merged = copy.deepcopy(mha)
    parts = {part: file_weights(tensors, f"{kohya_layer}_{part}") for part in PARTS}
    if not all(parts.values()):
        return merged
    qw, kw, vw = mha.in_proj_weight.detach().chunk(3, 0)
    in_delta = torch.cat([a1111_delta(parts[p], w) for p, w in zip(PARTS, (qw, kw, vw))], dim=0)
    out_delta = a1111_delta(parts["out_proj"], mha.out_proj.weight.detach())
    with torch.no_grad():
        merged.in_proj_weight += in_delta
        merged.out_proj.weight += out_delta
    return merged


def _adapt_held(model: nn.Module, network: str, kohya_layer: str) -> Adapters:
    """``model.block.attn`` adapted through the same calls ``adapters.inject`` makes."""
    parts = {part: Target(f"{kohya_layer}_{part}", "block.attn" + (".out_proj" if part == "out_proj" else ""),
                          "te") for part in PARTS}
    fused, others = split_fused_targets(model, list(parts.values()))
    assert others == [] and fused == {"block.attn": parts}
    slices = adapt_fused_attention(model, "block.attn", parts, _wrapper(network), RANK, ALPHA)
    return Adapters(network, slices)


# --- standalone nn.MultiheadAttention ------------------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("network", NETWORKS)
def test_zero_deltas_reproduce_the_base_exactly(network, batch_first):
    mha = _standalone(batch_first)
    adapter = FusedAttentionAdapter(mha, _wrapper(network))
    for p in adapter.adapter_parameters():
        assert p.dtype == torch.float32 and p.requires_grad
    delta_in, delta_out = adapter.deltas()
    assert delta_in.shape == (96, 32) and delta_out.shape == (32, 32)
    assert not delta_in.any() and not delta_out.any()
    for args, kwargs in _calls(batch_first):
        with torch.no_grad():
            expected, got = mha(*args, **kwargs), adapter(*args, **kwargs)
        assert torch.equal(got[0], expected[0])
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            assert torch.equal(got[1], expected[1])
        # With autograd on, the merged weight requires grad and torch's matmul may fold the
        # batch differently than for the frozen base: the same sums, rounded differently.
        got = adapter(*args, **kwargs)[0]
        assert got.requires_grad and torch.allclose(got, expected[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("network", NETWORKS)
def test_output_is_what_a1111_applies_from_the_exported_tensors(network, batch_first):
    model = _held(batch_first)
    mha = model.block.attn
    layer = "lora_te_text_model_encoder_layers_0_self_attn"
    adapters = _adapt_held(model, network, layer)
    _randomise(adapters.parameters_for("te"))
    tensors = kohya_tensors(adapters, torch.float32)
    assert {key.split(".")[0] for key in tensors} == {f"{layer}_{part}" for part in PARTS}
    reference = a1111_attention(mha, tensors, layer)
    for args, kwargs in _calls(batch_first):
        with torch.no_grad():
            got, expected, base = model.block.attn(*args, **kwargs)[0], reference(*args, **kwargs)[0], mha(*args, **kwargs)[0]
        contribution = (got - base).norm()
        assert contribution > 1e-2 * base.norm(), "the adapter has no effect"
        assert (got - expected).norm() / contribution < 1e-5


def test_a1111_ignores_a_partial_set():
    model = _held(False)
    mha = model.block.attn
    layer = "lora_te_text_model_encoder_layers_0_self_attn"
    adapters = _adapt_held(model, "lora", layer)
    _randomise(adapters.parameters_for("te"))
    tensors = {k: v for k, v in kohya_tensors(adapters, torch.float32).items() if "_out_proj." not in k}
    assert _state_hash(a1111_attention(mha, tensors, layer)) == _state_hash(mha)


def test_split_refuses_a_partial_set_and_keeps_other_targets():
    model = _held(False)
    model.block.mlp = nn.Linear(32, 32)
    q = Target("lora_te_x_self_attn_q_proj", "block.attn", "te")
    mlp = Target("lora_te_x_mlp_fc1", "block.mlp", "te")
    with pytest.raises(ValueError, match="missing k_proj, v_proj, out_proj"):
        split_fused_targets(model, [q, mlp])
    fused, others = split_fused_targets(model, [mlp])
    assert fused == {} and others == [mlp]


@pytest.mark.parametrize("dtype, device", LOW_PRECISION_BASES)
def test_half_precision_base_keeps_its_dtype_with_fp32_adapters(dtype, device):
    # fp16 on the meta device (dtypes without kernels: torch 2.1.2's CPU build has no fp16
    # matmul); bf16 runs the same code with numbers on the CPU.
    mha = _standalone(False).to(device, dtype)
    computed = device == "cpu"
    before = _state_hash(mha) if computed else None
    adapter = FusedAttentionAdapter(mha, _wrapper("lora"))
    _randomise(adapter.adapter_parameters())
    x = torch.randn(7, 2, 32, dtype=dtype, device=device)
    out = adapter(x, x, x, need_weights=False)[0]
    assert out.dtype == dtype and (not computed or torch.isfinite(out).all())
    out.float().sum().backward()
    for p in adapter.adapter_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    assert mha.in_proj_weight.dtype == dtype and (not computed or _state_hash(mha) == before)


# --- the tiny SD2 text encoder -------------------------------------------------------------

@pytest.fixture(scope="module")
def _sd2_pristine():
    return build_tiny_sd2(seed=0)


@pytest.fixture()
def sd2(_sd2_pristine):
    return copy.deepcopy(_sd2_pristine)


def _inject_te(model, network: str) -> tuple[Adapters, dict[str, nn.Module]]:
    """Adapt every fused attention of the text encoder as ``adapters.inject`` does."""
    targets = [t for t in find_targets(model, network, train_text_encoder=True) if t.part == "te"]
    fused, others = split_fused_targets(model, targets)
    assert others and all("mlp" in t.path for t in others)
    originals = {path: model.get_submodule(path) for path in fused}
    slices = []
    for path, parts in fused.items():
        slices += adapt_fused_attention(model, path, parts, _wrapper(network), RANK, ALPHA)
    return Adapters(network, slices), originals


def _cond(model, prompts=("a photo of sks", "")) -> torch.Tensor:
    return model.get_learned_conditioning(list(prompts))


@pytest.mark.parametrize("network", NETWORKS)
def test_text_encoder_zero_then_a1111_exact_then_restored(sd2, network):
    before_hash = _state_hash(sd2)
    with torch.no_grad():
        base = _cond(sd2)
    adapters, originals = _inject_te(sd2, network)
    assert len(originals) == len(sd2.cond_stage_model.model.transformer.resblocks) - 1
    for path in originals:
        adapter = sd2.get_submodule(path)
        assert isinstance(adapter, FusedAttentionAdapter) and adapter.base_layer is originals[path]
        assert adapter.training == originals[path].training
    with torch.no_grad():
        assert torch.equal(_cond(sd2), base)

    _randomise(adapters.parameters_for("te"), scale=0.1)
    tensors = kohya_tensors(adapters, torch.float32)
    reference = copy.deepcopy(sd2)
    for path, original in originals.items():  # A1111's model: plain attentions, merged weights
        parent, _, attr = path.rpartition(".")
        i = int(path.split(".")[-2])
        merged = a1111_attention(original, tensors, f"lora_te_text_model_encoder_layers_{i}_self_attn")
        setattr(reference.get_submodule(parent), attr, merged)
    with torch.no_grad():
        got, expected = _cond(sd2), _cond(reference)
    contribution = (got - base).norm()
    assert contribution > 1e-3 * base.norm(), "the adapters have no effect"
    assert (got - expected).norm() / contribution < 1e-4

    adapters.remove()
    for path, original in originals.items():
        assert sd2.get_submodule(path) is original
    assert _state_hash(sd2) == before_hash
    with torch.no_grad():
        assert torch.equal(_cond(sd2), base)


def test_gradients_reach_all_four_adapters_of_every_layer(sd2):
    adapters, originals = _inject_te(sd2, "lora")
    _randomise(adapters.parameters_for("te"), scale=0.1)
    _cond(sd2).pow(2).mean().backward()
    for layer in adapters.layers:
        for p in layer.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, layer.target.kohya_name
    parts = {layer.target.kohya_name.rsplit("_self_attn_", 1)[1] for layer in adapters.layers}
    assert parts == set(PARTS)
    assert all(p.grad is None for attention in originals.values() for p in attention.parameters())
    adapters.remove()


def test_dora_on_fused_attention_is_refused_and_leaves_nothing(sd2):
    """DoRA trains a magnitude that ``get_delta_weight`` (what the fused adapter merges) leaves
    out: inject refuses it with what to change, before any module is replaced."""
    assert not networks.get("dora").fused_attention
    before = _state_hash(sd2)
    modules = dict(sd2.named_modules())
    targets = find_targets(sd2, "dora", train_text_encoder=True)
    with pytest.raises(ValueError, match="DoRA cannot train this text encoder.*turn 'train text encoder' off"):
        inject(sd2, targets, TrainConfig(network="dora", rank=RANK, alpha=ALPHA))
    assert all(modules[name] is m for name, m in sd2.named_modules()) and _state_hash(sd2) == before
    unet_only = inject(sd2, [t for t in targets if t.part == "unet"], TrainConfig(network="dora"))
    unet_only.remove()
