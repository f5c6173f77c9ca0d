"""DoRA as A1111 1.10.1 applies it: LoCon's layers plus a magnitude per *input* column.

A1111 (``network.NetworkModule.apply_weight_decompose``) merges a file's ``lora_up/lora_down/
alpha`` into ``M = W + alpha/rank · up@down``, then rescales every input column of M (the
norm over the output dim and the kernel, per input channel) to the file's ``dora_scale``
(shape ``[1, in]`` for Linear, ``[1, in, 1, 1]`` for Conv2d)::

    W' = M · dora_scale / ||M||_col

peft's DoRA keeps one magnitude per *output* row, which no file can express. So the layers
here are peft's LoRA layers with peft's DoRA module swapped for one that normalises per input
column: its magnitude ``m`` starts at ``||W||_col`` (the delta starts at zero, as LoRA's
does) and is exported as ``dora_scale``. Scaling the columns of M is scaling the input
channels, so the forward is ``base(x·g) + (alpha/rank)·up(down(x·g))`` with ``g = m/||M||_col``,
written, like peft's, as an extra term added to the base layer's output. As in peft (and the
DoRA paper, §4.3) ``||M||_col`` is treated as a constant in the backward pass.

Not on fused attention (the q/k/v slices of SD2's and SDXL's OpenCLIP text encoder): those
are trained through ``get_delta_weight``, which is only the low-rank part here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora
from peft.tuners.lora.dora import DoraConv2dLayer, DoraLinearLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from . import lora as lora_type
from .base import ADAPTER, NetworkType


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖weight[:, j]‖ over the output dim (and kernel) per input channel j, shaped like A1111's
    ``dora_scale``: ``[1, in]`` or ``[1, in, 1, 1]``."""
    norm = weight.transpose(0, 1).flatten(1).norm(dim=1)
    return norm.reshape(1, -1, *[1] * (weight.dim() - 2))


def _low_rank(lora_A: torch.Tensor, lora_B: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``up @ down`` in the base weight's shape (kohya's flattening for convolutions)."""
    return (lora_B.flatten(1) @ lora_A.flatten(1)).reshape(shape)


class _ColumnMagnitude:
    """The parts of peft's ``DoraLinearLayer``/``DoraConv2dLayer`` that differ: the norm and
    the magnitude per input column, kept in fp32 whatever the base dtype."""

    def get_weight_norm(self, weight, lora_weight, scaling) -> torch.Tensor:
        return column_norm(weight + scaling * lora_weight)

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        weight = base_layer.weight.detach().float()
        low_rank = _low_rank(lora_A.detach().float(), lora_B.detach().float(), weight.shape)
        self.weight = torch.nn.Parameter(self.get_weight_norm(weight, low_rank, scaling), requires_grad=True)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer):
        """What to add to ``base_layer(x)`` (``x`` comes in the adapter's dtype, fp32)."""
        weight = base_layer.weight.to(x.dtype)
        low_rank = _low_rank(lora_A.weight, lora_B.weight, weight.shape).detach()
        gain = self.weight / self.get_weight_norm(weight, low_rank, scaling).detach()
        if weight.dim() == 2:
            gain = gain.view(-1)  # over x's last dim
        return self._base_op(x * (gain - 1), weight, base_layer) + lora_B(lora_A(x * gain)) * scaling


class ColumnDoraLinearLayer(_ColumnMagnitude, DoraLinearLayer):
    @staticmethod
    def _base_op(x, weight, base_layer):
        return F.linear(x, weight)


class ColumnDoraConv2dLayer(_ColumnMagnitude, DoraConv2dLayer):
    @staticmethod
    def _base_op(x, weight, base_layer):
        return F.conv2d(x, weight, None, base_layer.stride, base_layer.padding, base_layer.dilation,
                        base_layer.groups)


class _ColumnDoraInit:
    """peft's ``dora_init`` with the per-column module in place of peft's own."""

    magnitude_class: type

    def dora_init(self, adapter_name: str) -> None:
        if "lora_magnitude_vector" not in self.adapter_layer_names:
            self.adapter_layer_names = (*self.adapter_layer_names, "lora_magnitude_vector")
        magnitude = self.magnitude_class(fan_in_fan_out=False)
        magnitude.update_layer(base_layer=self.get_base_layer(), lora_A=self.lora_A[adapter_name].weight,
                               lora_B=self.lora_B[adapter_name].weight, scaling=self.scaling[adapter_name])
        self.lora_magnitude_vector[adapter_name] = magnitude


class DoraLinear(_ColumnDoraInit, lora.Linear):
    magnitude_class = ColumnDoraLinearLayer


class DoraConv2d(_ColumnDoraInit, lora.Conv2d):
    magnitude_class = ColumnDoraConv2dLayer


def create(module: torch.nn.Module, rank: int, alpha: float) -> BaseTunerLayer:
    cls = DoraConv2d if isinstance(module, torch.nn.Conv2d) else DoraLinear
    return cls(module, ADAPTER, r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
               use_dora=True)


def tensors(layer: BaseTunerLayer) -> dict[str, torch.nn.Parameter]:
    return {**lora_type.tensors(layer), "dora_scale": layer.lora_magnitude_vector[ADAPTER].weight}


#: LyCORIS writes DoRA as LoCon with ``dora_wd``. ``dora_scale`` multiplies the whole merged
#: weight: in fp16 its rounding (up to 2⁻¹¹) would scale every column, so it stays fp32.
DORA = NetworkType("dora", "DoRA", create, tensors, convs=True, fused_attention=False,
                   args={"algo": "locon", "dora_wd": "True"}, fp32_tensors=("dora_scale",))
