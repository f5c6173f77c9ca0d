"""peft adapters put in place on the model A1111 holds, and taken out again without a trace.

Each target module is wrapped by one of peft's layer classes (LoRA, LoHa or LoKr; Linear or
Conv2d) and the wrapper is set on the parent in place of the original. peft's model-wide
``inject_adapter_in_model`` is not used: it switches off ``requires_grad`` on the whole model,
and the user's model is not ours to change. Removing an adapter sets the original module
object back, so the model's modules, weights and flags are exactly what they were. A fused
``nn.MultiheadAttention`` (SD2's text encoder) is adapted by ``fused_attention`` instead.

Ranks follow kohya: 3×3 convolutions get ``conv_rank``/``conv_alpha``, Linear and 1×1
convolutions ``rank``/``alpha``. Adapter weights are fp32 on the base layer's device whatever
the base dtype (A1111 keeps the UNet in fp16).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
from peft.tuners.loha import layer as loha
from peft.tuners.lokr import layer as lokr
from peft.tuners.lora import layer as lora
from peft.tuners.tuners_utils import BaseTunerLayer

from .config import TrainConfig
from .fused_attention import FusedSlice, adapt_fused_attention, split_fused_targets
from .targets import Target

#: peft's adapter name; there is only ever one adapter per layer here.
ADAPTER = "default"


class _Fp32DeltaInput:
    """peft's LoHa/LoKr layers compute ``F.linear/conv2d(x, delta_weight)`` with ``x`` in the
    base dtype; with fp32 adapters on an fp16 base that is a dtype error outside autocast.
    Feed the delta path fp32 input: the layer's ``forward`` casts the sum back to x's dtype."""

    def _get_delta_activations(self, adapter_name: str, input: torch.Tensor, *args, **kwargs):
        return super()._get_delta_activations(adapter_name, input.to(torch.float32), *args, **kwargs)


class LoHaLinear(_Fp32DeltaInput, loha.Linear):
    pass


class LoHaConv2d(_Fp32DeltaInput, loha.Conv2d):
    pass


class LoKrLinear(_Fp32DeltaInput, lokr.Linear):
    pass


class LoKrConv2d(_Fp32DeltaInput, lokr.Conv2d):
    pass


@dataclass
class AdaptedLayer:
    """One target with its adapter: ``wrapper`` (a peft layer) holds ``base`` (the original
    module), and takes its place as ``parent.<attr>`` while installed."""

    target: Target
    base: torch.nn.Module
    wrapper: BaseTunerLayer
    parent: torch.nn.Module
    attr: str
    rank: int
    alpha: float

    def install(self, on: bool) -> None:
        setattr(self.parent, self.attr, self.wrapper if on else self.base)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in self.wrapper.adapter_layer_names
                for p in getattr(self.wrapper, name).parameters()]


#: One adapted target: an ordinary wrapped module, or one part of a fused attention.
Layer = AdaptedLayer | FusedSlice


class Adapters:
    """The adapters of one training run on one model."""

    def __init__(self, network: str, layers: list[Layer]):
        self.network = network
        self.layers = layers
        self.targets = [layer.target for layer in layers]
        self._installed = True
        self._removed = False

    def parameters_for(self, part: str) -> list[torch.nn.Parameter]:
        """Trainable adapter weights of the "unet" or "te" targets."""
        return [p for layer in self.layers if layer.target.part == part for p in layer.parameters()]

    def remove(self) -> None:
        """Put the original module objects back. Safe to call more than once."""
        if not self._removed:
            self._install(False)
            self._removed = True

    @contextlib.contextmanager
    def enabled(self, on: bool) -> Iterator[None]:
        """Run the block with the adapters in place (True) or with the original modules (False),
        e.g. for a "no LoRA" comparison render; the previous state comes back afterwards."""
        if self._removed:
            raise RuntimeError("adapters were removed")
        before = self._installed
        self._install(on)
        try:
            yield
        finally:
            if not self._removed:  # remove() inside the block wins
                self._install(before)

    def _install(self, on: bool) -> None:
        for layer in reversed(self.layers):
            layer.install(on)
        self._installed = on


def rank_alpha(module: torch.nn.Module, config: TrainConfig) -> tuple[int, float]:
    """kohya's rule: convolutions with a kernel larger than 1×1 use the conv rank/alpha."""
    if isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1):
        return config.conv_rank, config.conv_alpha
    return config.rank, config.alpha


def _wrap(module: torch.nn.Module, network: str, rank: int, alpha: float) -> BaseTunerLayer:
    conv = isinstance(module, torch.nn.Conv2d)
    if network in ("lora", "locon"):
        cls = lora.Conv2d if conv else lora.Linear
        return cls(module, ADAPTER, r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True)
    lycoris = dict(adapter_name=ADAPTER, r=rank, alpha=alpha, rank_dropout=0.0, module_dropout=0.0,
                   init_weights=True, use_effective_conv2d=False)
    if network == "loha":
        return (LoHaConv2d if conv else LoHaLinear)(module, **lycoris)
    if network == "lokr":
        return (LoKrConv2d if conv else LoKrLinear)(module, decompose_both=False, decompose_factor=-1,
                                                    **lycoris)
    raise ValueError(f"unknown network type {network!r}")


def _adapt(model: torch.nn.Module, target: Target, config: TrainConfig) -> AdaptedLayer:
    parent_path, _, attr = target.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    base = getattr(parent, attr)
    if isinstance(base, BaseTunerLayer):
        raise ValueError(f"{target.path} already has an adapter")
    if type(base) not in (torch.nn.Linear, torch.nn.Conv2d):
        raise TypeError(f"{target.path}: cannot adapt a {type(base).__name__} (only Linear and Conv2d)")
    rank, alpha = rank_alpha(base, config)
    wrapper = _wrap(base, config.network, rank, alpha)
    for module in wrapper.modules():  # the wrapper's own parts follow the base's mode
        if module is not base:
            module.training = base.training
    layer = AdaptedLayer(target, base, wrapper, parent, attr, rank, alpha)
    for p in layer.parameters():  # peft cast them to the base dtype; training wants fp32
        p.data = p.data.to(torch.float32)
        p.requires_grad_(True)
    layer.install(True)
    return layer


def inject(model: torch.nn.Module, targets: list[Target], config: TrainConfig) -> Adapters:
    """Wrap every target of ``model`` with a fresh adapter of ``config.network``.

    Adapters start as kohya/peft do: the delta is exactly zero (LoRA's up, LoHa's w2_b and
    LoKr's w1 are zeros). The q/k/v/out_proj targets of a fused ``nn.MultiheadAttention``
    (SD2's text encoder) are adapted together by ``fused_attention``. If any target fails,
    every module already wrapped is put back before the error propagates."""
    layers: list[Layer] = []
    try:
        fused, others = split_fused_targets(model, targets)
        for target in others:
            layers.append(_adapt(model, target, config))
        wrap = functools.partial(_wrap, network=config.network, rank=config.rank, alpha=config.alpha)
        for path, parts in fused.items():
            layers += adapt_fused_attention(model, path, parts, wrap, config.rank, config.alpha)
    except BaseException:
        Adapters(config.network, layers).remove()
        raise
    order = {target: i for i, target in enumerate(targets)}
    layers.sort(key=lambda layer: order[layer.target])
    return Adapters(config.network, layers)
