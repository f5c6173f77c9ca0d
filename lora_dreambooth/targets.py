"""Which modules of an ldm model get adapters, and the kohya name of each.

(Being written: see find_targets.)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One module to adapt.

    kohya_name: the key prefix in the exported file, e.g.
        ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.
    path: the module's dotted path from the LatentDiffusion model, as ``model.get_submodule``
        takes it, e.g. ``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``.
    part: "unet" or "te".
    locon_only: True for targets that only LoCon-style networks (conv_dim set) adapt:
        Linear/Conv2d inside ResBlocks and the down/up-sample convolutions.
    """

    kohya_name: str
    path: str
    part: str
    locon_only: bool = False
