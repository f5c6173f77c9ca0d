"""LoCon (LyCORIS' ``algo=locon``): LoRA that also adapts the ResBlocks and 3×3 convolutions,
those with ``conv_rank``/``conv_alpha``. The tensors are LoRA's (A1111's ``network_lora.py``
reads both)."""
from __future__ import annotations

from . import lora
from .base import NetworkType

LOCON = NetworkType("locon", "LoCon", lora.create, lora.tensors, convs=True, args={"algo": "locon"})
