"""Full-size models for the benchmarks, with random weights (no model hub, no downloads).

``sd15_model`` trains: SD1.5's UNet (320 channels, ×1 ×2 ×4 ×4, attention with 8 heads on the
first three levels, context 768: 860 M parameters), a 12-layer 768-wide CLIP text encoder (its
MLP is 2×, not CLIP-L's 4× wide: 85 M instead of 123 M parameters) and SD's VAE (84 M).
``sdxl_model`` trains: SDXL base's UNet (2567 M), that CLIP as te1 (penultimate layer), OpenCLIP
bigG (te2, 695 M) and SD's VAE, built as the tests' tiny SDXL (``build_tiny_sdxl``) at full size.
``state_of`` gives the tensors of SD1.5 or SDXL base at their real shapes, built on the meta
device and then allocated and written for real (every page touched, so reading them costs
what reading a loaded model costs): for timing what reads every weight (the guard).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_dreambooth.tiny import build_tiny_sd1, unet_config, write_tiny_clip  # noqa: E402

#: Text encoders as (width, layers, heads): CLIP-L (SD1.5's; SDXL's te1), OpenCLIP bigG (SDXL's te2).
CLIP_L, OPENCLIP_BIGG = (768, 12, 12), (1280, 32, 20)
#: SDXL's size/crop embedding width (per number).
SDXL_SIZE_EMBEDDING = 256

#: SD's AutoencoderKL (both SD1.5 and SDXL): 128 channels, ×1 ×2 ×4 ×4, 2 res blocks.
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def sd_vae() -> torch.nn.Module:
    from ldm.models.autoencoder import AutoencoderKL
    return AutoencoderKL(ddconfig=SD_VAE, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)


def sd15_model(work: str) -> torch.nn.Module:
    """An SD1.5-sized ``LatentDiffusion`` (fp32, CPU, eval) as A1111 holds it."""
    from ldm.models.diffusion.ddpm import disabled_train

    clip_dir = write_tiny_clip(os.path.join(work, "clip-768x12"), *CLIP_L)
    model = build_tiny_sd1(clip_dir=clip_dir, model_channels=320, channel_mult=(1, 2, 4, 4), context_dim=768,
                           num_heads=8)
    vae = sd_vae().eval()
    vae.train = disabled_train  # what LatentDiffusion.instantiate_first_stage does
    vae.requires_grad_(False)
    model.first_stage_model = vae
    return model


def sdxl_model(work: str) -> torch.nn.Module:
    """An SDXL-base-sized ``DiffusionEngine`` (fp32, CPU, eval) as A1111 holds it: the tests'
    SDXL stand-in (``build_tiny_sdxl``) with SDXL base's UNet, text encoders and SD's VAE."""
    from tests.tiny_models import build_tiny_sdxl

    clip_dir = write_tiny_clip(os.path.join(work, "clip-l"), *CLIP_L)
    return build_tiny_sdxl(clip_dir=clip_dir, te1=CLIP_L, te2=OPENCLIP_BIGG, size_embedding=SDXL_SIZE_EMBEDDING,
                           unet={}, vae=sd_vae())


def _clip_text(hidden: int, layers: int, heads: int, projection: bool) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                            num_attention_heads=heads, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _sd15_parts() -> dict[str, torch.nn.Module]:
    from ldm.util import instantiate_from_config
    return {"unet": instantiate_from_config(unet_config(320, (1, 2, 4, 4), 768, num_heads=8)),
            "text": _clip_text(*CLIP_L, False), "vae": sd_vae()}


def _sdxl_parts() -> dict[str, torch.nn.Module]:
    from tests.tiny_models import sdxl_unet
    return {"unet": sdxl_unet(), "text_l": _clip_text(*CLIP_L, False),
            "text_g": _clip_text(*OPENCLIP_BIGG, True), "vae": sd_vae()}


def parts(family: str) -> dict[str, torch.nn.Module]:
    """The UNet, text encoder(s) and VAE of ``family`` ("sd15" or "sdxl") at their real shapes
    (build under ``torch.device("meta")`` to allocate nothing)."""
    return _sd15_parts() if family == "sd15" else _sdxl_parts()


def state_of(family: str, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """Every parameter and buffer of ``family`` ("sd15" or "sdxl") at its real shape, in
    ``dtype`` on ``device``, each filled with a distinct value."""
    with torch.device("meta"):
        modules = parts(family)
    model = torch.nn.ModuleDict(modules).to_empty(device=device).to(dtype)
    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):
            tensor.fill_(i % 251 / 251)
    return model


def describe(model: torch.nn.Module) -> str:
    tensors = list(model.state_dict().values())
    size = sum(t.numel() * t.element_size() for t in tensors)
    return f"{sum(t.numel() for t in tensors) / 1e6:.0f} M values in {len(tensors)} tensors, {size / 2 ** 30:.2f} GiB"
