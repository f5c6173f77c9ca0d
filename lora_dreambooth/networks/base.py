"""What a network type is: the one record each ``networks/<type>.py`` module fills in.

Modelled on A1111's ``extensions-builtin/Lora`` (one ``network_<type>.py`` per type, listed in
``networks.module_types``) and peft's ``tuners/`` (one layer class per method). A type says how
its peft layer is built on a target module, which targets it takes, which tensors a kohya/A1111
file holds for a layer (the same tensors a resume loads back), what the file's alpha and
``ss_network_*`` metadata are, and which options (``TrainConfig`` fields) shape it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

#: peft's adapter name; there is only ever one adapter per layer here.
ADAPTER = "default"

#: Builds the peft layer around one ``nn.Linear``/``nn.Conv2d``: ``create(module, rank, alpha)``.
Create = Callable[[torch.nn.Module, int, float], BaseTunerLayer]
#: kohya suffix → the layer's own parameter: ``tensors(peft_layer)``.
Tensors = Callable[[BaseTunerLayer], "dict[str, torch.nn.Parameter]"]


@dataclass(frozen=True)
class NetworkType:
    """One network type.

    name: the config/API value (``"lora"``). label: how people write it (``"LoRA"``).
    create / tensors: see :data:`Create` / :data:`Tensors`.
    convs: also adapts the ResBlock layers and 3×3 convolutions (targets with ``locon_only``),
        with their own ``conv_rank``/``conv_alpha`` options (kohya's ``conv_dim``).
    applies_alpha: peft scales the delta by alpha/rank. When it does not (peft 0.13.2's LoKr)
        the file records alpha = rank, so that A1111's scale is 1 as well.
    fused_attention: can adapt the q/k/v slices of a fused ``nn.MultiheadAttention``
        (``fused_attention.py``: SD2's and SDXL's OpenCLIP text encoder).
    module / args: ``ss_network_module`` and the ``ss_network_args`` entries that identify
        files of this type (kohya's ``networks.lora``; LyCORIS' ``lycoris.kohya`` + ``algo``).
    fp32_tensors: suffixes written in float32 whatever the save precision (tiny tensors whose
        rounding would scale the whole base weight).
    """

    name: str
    label: str
    create: Create
    tensors: Tensors
    convs: bool = False
    applies_alpha: bool = True
    fused_attention: bool = True
    module: str = "lycoris.kohya"
    args: dict[str, str] = field(default_factory=dict)
    fp32_tensors: tuple[str, ...] = ()

    @property
    def options(self) -> tuple[str, ...]:
        """The ``TrainConfig`` fields that shape this type's layers (and a resume must repeat)."""
        return ("rank", "alpha", "conv_rank", "conv_alpha") if self.convs else ("rank", "alpha")

    def file_alpha(self, rank: int, alpha: float) -> float:
        """The alpha written to the file so that A1111's alpha/rank is the scale trained with."""
        return float(alpha if self.applies_alpha else rank)

    def network_args(self, conv_rank: int, conv_alpha: float) -> dict[str, str]:
        """``ss_network_args`` (empty for kohya's plain LoRA, which has none)."""
        if not self.args and not self.convs:
            return {}
        conv = {"conv_dim": str(conv_rank), "conv_alpha": str(self.file_alpha(conv_rank, conv_alpha))}
        return {**self.args, **(conv if self.convs else {})}


class Fp32DeltaInput:
    """peft's LoHa/LoKr layers compute ``F.linear/conv2d(x, delta_weight)`` with ``x`` in the
    base dtype; with fp32 adapters on an fp16 base that is a dtype error outside autocast.
    Feed the delta path fp32 input: the layer's ``forward`` casts the sum back to x's dtype."""

    def _get_delta_activations(self, adapter_name: str, input: torch.Tensor, *args, **kwargs):
        return super()._get_delta_activations(adapter_name, input.to(torch.float32), *args, **kwargs)


def lycoris_create(linear: type, conv: type, **options) -> Create:
    """``create`` for peft's LyCORIS-style layer classes (LoHa, LoKr): no dropout, peft's
    initialisation (the delta starts at zero, as kohya's does), fp32 input for the delta path
    (:class:`Fp32DeltaInput`); ``options`` are the type's own constructor arguments."""
    classes = {cls: type(cls.__name__, (Fp32DeltaInput, cls), {"__module__": cls.__module__})
               for cls in (linear, conv)}

    def create(module: torch.nn.Module, rank: int, alpha: float) -> BaseTunerLayer:
        cls = classes[conv if isinstance(module, torch.nn.Conv2d) else linear]
        return cls(module, adapter_name=ADAPTER, r=rank, alpha=alpha, rank_dropout=0.0, module_dropout=0.0,
                   init_weights=True, use_effective_conv2d=False, **options)
    return create


def adapter_parameters(layer: BaseTunerLayer) -> "list[torch.nn.Parameter]":
    """The layer's adapter weights (not its base layer's)."""
    return [p for name in layer.adapter_layer_names for p in getattr(layer, name).parameters()]


def own_parameters(layer: BaseTunerLayer) -> "dict[str, torch.nn.Parameter]":
    """peft's LoHa/LoKr parameter names (``hada_w1_a``, ``lokr_w2_b``, ...) are the kohya
    suffixes, with the same layouts (verified against A1111's calc_updown in tests/test_export.py)."""
    return {name: getattr(layer, name)[ADAPTER] for name in layer.adapter_layer_names
            if ADAPTER in getattr(layer, name)}


__all__ = ["ADAPTER", "Create", "Tensors", "NetworkType", "Fp32DeltaInput", "lycoris_create", "adapter_parameters",
           "own_parameters"]
