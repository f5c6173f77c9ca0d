"""peft adapters put in place on the model A1111 holds, and taken out again without a trace.

Each target module is wrapped by the peft layer its network type builds (``networks``;
Linear or Conv2d) and the wrapper is set on the parent in place of the original. peft's model-wide
``inject_adapter_in_model`` is not used: it switches off ``requires_grad`` on the whole model,
and the user's model is not ours to change. Removing an adapter sets the original module
object back, so the model's modules, weights and flags are exactly what they were. A fused
``nn.MultiheadAttention`` (SD2's text encoder) is adapted by ``fused_attention`` instead.

Ranks follow kohya: 3×3 convolutions get ``conv_rank``/``conv_alpha``, Linear and 1×1
convolutions ``rank``/``alpha``. Adapter weights are fp32 on the base layer's device whatever
the base dtype (A1111 keeps the UNet in fp16).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from diffusers.training_utils import cast_training_params
from peft.tuners.tuners_utils import BaseTunerLayer

from . import networks
from .config import TrainConfig
from .fused_attention import FusedSlice, adapt_fused_attention, split_fused_targets
from .networks.base import adapter_parameters
from .targets import Target, find_targets


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
        return adapter_parameters(self.wrapper)


#: One adapted target: an ordinary wrapped module, or one part of a fused attention.
Layer = AdaptedLayer | FusedSlice


class Adapters:
    """The adapters of one training run on one model."""

    def __init__(self, network: str, layers: list[Layer]):
        self.network = network
        self.layers = layers
        self.targets = [layer.target for layer in layers]
        self._removed = False

    def parameters_for(self, part: str) -> list[torch.nn.Parameter]:
        """Trainable adapter weights of the "unet" or "te" targets."""
        return [p for layer in self.layers if layer.target.part == part for p in layer.parameters()]

    def remove(self) -> None:
        """Put the original module objects back. Safe to call more than once."""
        if not self._removed:
            for layer in reversed(self.layers):
                layer.install(False)
            self._removed = True


def rank_alpha(module: torch.nn.Module, config: TrainConfig) -> tuple[int, float]:
    """kohya's rule: convolutions with a kernel larger than 1×1 use the conv rank/alpha."""
    if isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1):
        return config.conv_rank, config.conv_alpha
    return config.rank, config.alpha


def create_layer(module: torch.nn.Module, network: networks.NetworkType, rank: int, alpha: float) -> BaseTunerLayer:
    """``network``'s peft layer around ``module``, its adapter weights trainable and fp32 (peft
    gives them the base's dtype), its own parts in the base's train/eval mode."""
    wrapper = network.create(module, rank, alpha)
    for p in adapter_parameters(wrapper):
        p.requires_grad_(True)
    cast_training_params([getattr(wrapper, name) for name in wrapper.adapter_layer_names], torch.float32)
    for part in wrapper.modules():
        if part is not module:
            part.training = module.training
    return wrapper


def _adapt(model: torch.nn.Module, target: Target, config: TrainConfig) -> AdaptedLayer:
    parent_path, _, attr = target.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    base = getattr(parent, attr)
    if isinstance(base, BaseTunerLayer):
        raise ValueError(f"{target.path} already has an adapter")
    if type(base) not in (torch.nn.Linear, torch.nn.Conv2d):
        raise TypeError(f"{target.path}: cannot adapt a {type(base).__name__} (only Linear and Conv2d)")
    rank, alpha = rank_alpha(base, config)
    wrapper = create_layer(base, networks.get(config.network), rank, alpha)
    layer = AdaptedLayer(target, base, wrapper, parent, attr, rank, alpha)
    layer.install(True)
    return layer


def _fused_refusal(network: networks.NetworkType) -> str:
    return (f"{network.label} cannot train this text encoder (its q/k/v live in one fused attention layer): "
            "turn 'train text encoder' off, or pick another network type")


def network_problem(model: torch.nn.Module, config: TrainConfig) -> str:
    """Why ``inject`` would refuse ``config.network`` on ``model`` ("" when it would not): a type
    that cannot adapt fused attention with a text encoder that has it (SD2's, SDXL's OpenCLIP).
    Lets a host say so before a run starts."""
    network = networks.get(config.network)
    if network.fused_attention or not config.train_text_encoder:
        return ""
    fused, _ = split_fused_targets(model, find_targets(model, config.network, train_text_encoder=True))
    return _fused_refusal(network) if fused else ""


def inject(model: torch.nn.Module, targets: list[Target], config: TrainConfig) -> Adapters:
    """Wrap every target of ``model`` with a fresh adapter of ``config.network``.

    Adapters start as kohya/peft do: the delta is exactly zero (LoRA's up, LoHa's w2_b and
    LoKr's w1 are zeros; DoRA's magnitude is the base's column norm). The q/k/v/out_proj
    targets of a fused ``nn.MultiheadAttention`` (SD2's and SDXL's OpenCLIP text encoder) are
    adapted together by ``fused_attention``, for the types that can. If any target fails,
    every module already wrapped is put back before the error propagates."""
    network = networks.get(config.network)
    layers: list[Layer] = []
    try:
        fused, others = split_fused_targets(model, targets)
        if fused and not network.fused_attention:
            raise ValueError(_fused_refusal(network))
        for target in others:
            layers.append(_adapt(model, target, config))
        wrap = functools.partial(create_layer, network=network, rank=config.rank, alpha=config.alpha)
        for path, parts in fused.items():
            layers += adapt_fused_attention(model, path, parts, wrap, config.rank, config.alpha)
    except BaseException:
        Adapters(config.network, layers).remove()
        raise
    order = {target: i for i, target in enumerate(targets)}
    layers.sort(key=lambda layer: order[layer.target])
    return Adapters(config.network, layers)
