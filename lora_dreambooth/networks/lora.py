"""LoRA (kohya's ``networks.lora``): ``up @ down × alpha/rank`` on attention Linear and 1×1
convolution layers (A1111's ``network_lora.py``; peft's ``tuners/lora``)."""
from __future__ import annotations

import torch
from peft.tuners.lora import layer as lora
from peft.tuners.tuners_utils import BaseTunerLayer

from .base import ADAPTER, NetworkType


def create(module: torch.nn.Module, rank: int, alpha: float) -> BaseTunerLayer:
    cls = lora.Conv2d if isinstance(module, torch.nn.Conv2d) else lora.Linear
    return cls(module, ADAPTER, r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True)


def tensors(layer: BaseTunerLayer) -> dict[str, torch.nn.Parameter]:
    """peft's lora_A/lora_B are kohya's lora_down/lora_up with the same shapes (4-D for
    convolutions, 1×1 up). Never write lora_A/lora_B names: A1111 drops alpha for them."""
    return {"lora_down.weight": layer.lora_A[ADAPTER].weight, "lora_up.weight": layer.lora_B[ADAPTER].weight}


LORA = NetworkType("lora", "LoRA", create, tensors, module="networks.lora")
