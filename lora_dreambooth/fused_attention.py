"""Adapters for a fused ``nn.MultiheadAttention`` (OpenCLIP's, in SD2's text encoder).

kohya writes such a layer as four HF-style entries, ``…_self_attn_q_proj/k_proj/v_proj/
out_proj``, and A1111 1.10.1 applies them to the ``MultiheadAttention`` only when all four are
in the file: ``in_proj_weight += cat(Δq, Δk, Δv)`` (rows q, k, v) and ``out_proj.weight +=
Δout``. peft cannot adapt a slice of a fused ``in_proj``, and a peft wrapper on ``out_proj``
would do nothing (the attention reads ``out_proj.weight`` without calling the module).

So one :class:`FusedAttentionAdapter` takes the attention's place while training. It holds
four peft layers, each around a plain ``nn.Linear(d, d)`` whose weight is a view of its slice
(no copy), and runs the original module's own forward with ``in_proj_weight + cat(Δq, Δk, Δv)``
and ``out_proj.weight + Δout``, every Δ being that peft layer's ``get_delta_weight``. The
trained function is therefore exactly what A1111 computes from the exported tensors, and each
slice exports like an ordinary Linear target (same peft layer classes, same tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .networks.base import adapter_parameters
from .targets import Target, fused_qkv_index

#: kohya's suffixes for the four parts of one fused attention, in ``in_proj`` row order.
PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")

#: Builds the peft layer (its network type's ``Linear``, fp32 adapter weights) around one slice's
#: ``nn.Linear``.
WrapLinear = Callable[[nn.Linear], BaseTunerLayer]


class FusedAttentionAdapter(nn.Module):
    """Stands in for ``base_layer`` (a fused ``nn.MultiheadAttention``) with q/k/v/out adapters.

    Called with whatever the attention is called with (``batch_first``, masks, need_weights
    all behave as in the base): the base's own forward (A1111's class-level patch included)
    runs with the adapted weights swapped in by ``torch.func.functional_call``. The merged
    weights are formed in fp32 and cast to the base dtype, as A1111 merges a LoRA into an
    fp16 model; the cast passes gradients through unchanged. Zero deltas give the base's
    output bit for bit without autograd; with autograd on, torch's matmul may fold the batch
    differently for a weight that requires grad (same sums, different rounding).
    Adapter parameters are what ``wrap`` makes them (``adapters.create_layer``: fp32 and
    trainable); the base is not touched. Network types whose peft layer is more than its
    ``get_delta_weight`` (DoRA's magnitude) cannot be used here (``NetworkType.fused_attention``).

    A1111's patched forward restores a deactivated LoRA's backup *lazily* into whatever
    ``in_proj_weight`` it sees, which here is the swapped-in tensor: A1111's networks must be
    restored before this wrapper goes in, not on the next forward.
    """

    def __init__(self, base_layer: nn.MultiheadAttention, wrap: WrapLinear):
        super().__init__()
        if not (isinstance(base_layer, nn.MultiheadAttention) and base_layer._qkv_same_embed_dim):
            raise TypeError("FusedAttentionAdapter needs an nn.MultiheadAttention with a fused in_proj")
        self.base_layer = base_layer
        d = base_layer.embed_dim
        slices = [base_layer.in_proj_weight.detach()[i * d:(i + 1) * d] for i in range(3)]
        slices.append(base_layer.out_proj.weight.detach())
        self.parts = nn.ModuleDict({part: wrap(_linear_view(w)) for part, w in zip(PARTS, slices)})
        self.training = base_layer.training  # the new modules follow the base's train/eval mode
        for module in self.parts.modules():
            module.training = base_layer.training

    def adapter_layers(self) -> dict[str, BaseTunerLayer]:
        """``"q_proj"``/``"k_proj"``/``"v_proj"``/``"out_proj"`` → that slice's peft layer."""
        return dict(self.parts.items())

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable adapter weights of all four parts (not the base's weights)."""
        return [p for layer in self.parts.values() for p in adapter_parameters(layer)]

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(Δin_proj (3d, d), Δout_proj (d, d))``: what A1111 adds to the weights."""
        q, k, v, out = (_delta(self.parts[part]) for part in PARTS)
        return torch.cat([q, k, v], dim=0), out

    def forward(self, *args, **kwargs):
        base = self.base_layer
        delta_in, delta_out = self.deltas()
        weights = {
            "in_proj_weight": (base.in_proj_weight + delta_in).to(base.in_proj_weight.dtype),
            "out_proj.weight": (base.out_proj.weight + delta_out).to(base.out_proj.weight.dtype),
        }
        return torch.func.functional_call(base, weights, args, kwargs)


def _linear_view(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight shares ``weight``'s storage: what peft's Linear layers
    wrap, giving them the slice's shape, dtype and device without copying it."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def _delta(layer: BaseTunerLayer) -> torch.Tensor:
    """The layer's weight delta, summed over its active adapters like peft's forward does."""
    return sum(layer.get_delta_weight(name) for name in layer.active_adapters)


@dataclass
class FusedSlice:
    """One of the four targets of a fused attention, shaped like ``adapters.AdaptedLayer`` so
    ``Adapters`` and the export treat it as an ordinary Linear target.

    wrapper: this part's peft layer (its tensors are the part's kohya tensors).
    base: the ``nn.Linear`` view of the part's weight that ``wrapper`` wraps.
    adapter / attention: the :class:`FusedAttentionAdapter` and the original attention it
    replaces as ``parent.<attr>`` while installed (all four slices of a layer share them).
    """

    target: Target
    base: nn.Linear
    wrapper: BaseTunerLayer
    parent: nn.Module
    attr: str
    rank: int
    alpha: float
    adapter: FusedAttentionAdapter
    attention: nn.MultiheadAttention

    def install(self, on: bool) -> None:
        setattr(self.parent, self.attr, self.adapter if on else self.attention)

    def parameters(self) -> list[nn.Parameter]:
        return adapter_parameters(self.wrapper)


def split_fused_targets(model: nn.Module, targets: list[Target]
                        ) -> tuple[dict[str, dict[str, Target]], list[Target]]:
    """``({attention path: {part: target}}, other targets)``.

    A fused attention's q/k/v targets have the attention's path (see
    :func:`targets.fused_qkv_index`); its out_proj target is ``<attention path>.out_proj``.
    Every attention must come with all four parts: A1111 silently ignores a partial set."""
    fused: dict[str, dict[str, Target]] = {}
    others: list[Target] = []
    for target in targets:
        index = fused_qkv_index(target)
        parent_path, _, attr = target.path.rpartition(".")
        if index is not None:
            path, part = target.path, PARTS[index]
        elif attr == "out_proj" and _attention_at(model, parent_path) is not None:
            path, part = parent_path, "out_proj"
        else:
            others.append(target)
            continue
        if part in fused.setdefault(path, {}):
            raise ValueError(f"{target.kohya_name}: {part} of {path} is targeted twice")
        fused[path][part] = target
    for path, parts in fused.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise ValueError(f"{path}: the fused attention needs q/k/v/out_proj adapters together "
                             f"(A1111 ignores a partial set); missing {', '.join(missing)}")
    return fused, others


def _attention_at(model: nn.Module, path: str) -> nn.MultiheadAttention | None:
    module = model.get_submodule(path) if path else model
    if isinstance(module, FusedAttentionAdapter):
        raise ValueError(f"{path} already has an adapter")
    return module if isinstance(module, nn.MultiheadAttention) else None


def adapt_fused_attention(model: nn.Module, path: str, parts: dict[str, Target], wrap: WrapLinear,
                          rank: int, alpha: float) -> list[FusedSlice]:
    """Put a :class:`FusedAttentionAdapter` in place of the attention at ``path`` and return
    one :class:`FusedSlice` per part (in ``parts``' order). ``wrap`` builds the peft layers;
    ``rank``/``alpha`` are the ones it was given (the export writes them)."""
    attention = _attention_at(model, path)
    if attention is None:
        raise TypeError(f"{path}: not an nn.MultiheadAttention")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    adapter = FusedAttentionAdapter(attention, wrap)
    layers = adapter.adapter_layers()
    slices = [FusedSlice(target, layers[part].get_base_layer(), layers[part], parent, attr, rank, alpha,
                         adapter, attention) for part, target in parts.items()]
    slices[0].install(True)
    return slices


__all__ = ["PARTS", "WrapLinear", "FusedAttentionAdapter", "FusedSlice", "split_fused_targets",
           "adapt_fused_attention"]
