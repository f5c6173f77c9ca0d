"""A tiny SD1 model built in code from the same ldm classes A1111 uses, for the demo.

No weights are downloaded: every tensor is random. The demo (and the tests and benchmarks)
use it to exercise the real ldm code paths (``LatentDiffusion``, ``UNetModel``,
``AutoencoderKL``, ``FrozenCLIPEmbedder``) on CPU in seconds. The SD2 and SDXL stand-ins,
which only tests and benchmarks use, live in ``tests/tiny_models.py`` and build on these parts.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
_VAE_TARGET = "ldm.models.autoencoder.AutoencoderKL"
_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
_LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"

#: Words given their own single token in the tiny vocabulary, so prompts tokenize like
#: real ones (one token per common word) and triggers like "wpg" split into pieces.
TINY_WORDS = ("a", "photo", "of", "woman", "girl", "man", "person", "dog", "cat", "hat",
              "wear", "eating", "ramen", "illustration", "sks", "shs", "ohwx", "blurry", "ugly",
              "low", "res", ",")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte→printable-unicode table (the base alphabet of its BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_clip(folder: str, hidden: int = 32, layers: int = 2, heads: int = 2) -> str:
    """Write a tiny CLIP text model and tokenizer (random weights) that
    ``CLIPTextModel.from_pretrained`` / ``CLIPTokenizer.from_pretrained`` read offline, in
    ``folder`` (made if missing)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    os.makedirs(folder, exist_ok=True)

    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            merged = pieces[0] + pieces[1]
            if merged not in vocab_tokens:
                vocab_tokens.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77, "pad_token": "<|endoftext|>"}, f)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def unet_config(model_channels: int = 32, channel_mult: tuple[int, ...] = (1, 2),
                context_dim: int = 32, linear_transformer: bool = False, num_heads: int = 2) -> dict[str, Any]:
    """ldm UNetModel parameters with SD's layout at a tiny width: 2 res blocks per level,
    spatial transformers on every level but the deepest (A1111's name mapping assumes that),
    ``num_heads`` attention heads (SD1: 8)."""
    return {
        "target": _UNET_TARGET,
        "params": {
            "image_size": 8, "in_channels": 4, "out_channels": 4,
            "model_channels": model_channels, "channel_mult": list(channel_mult),
            "num_res_blocks": 2, "attention_resolutions": [2 ** i for i in range(len(channel_mult) - 1)],
            "num_heads": num_heads, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": context_dim, "use_checkpoint": False, "legacy": False,
            "use_linear_in_transformer": linear_transformer,
        },
    }


def vae_config() -> dict[str, Any]:
    """A tiny AutoencoderKL with SD's 8× downsampling and 4 latent channels."""
    return {
        "target": _VAE_TARGET,
        "params": {
            "embed_dim": 4,
            "lossconfig": {"target": "torch.nn.Identity"},
            "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                         "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                         "attn_resolutions": [], "dropout": 0.0},
        },
    }


def randomise_zero_inits(model: torch.nn.Module, seed: int) -> None:
    """ldm initialises the UNet output conv and every ``proj_out`` to zeros; with those the
    gradient reaching every adapter upstream is exactly 0. Give them small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() > 1 and not weight.any():
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.05)


def build_tiny_sd1(seed: int = 0, clip_dir: str | None = None, model_channels: int = 32,
                   channel_mult: tuple[int, ...] = (1, 2), parameterization: str = "eps",
                   context_dim: int = 32, num_heads: int = 2):
    """A tiny SD1-layout ``LatentDiffusion`` on CPU in fp32, in eval mode as A1111 holds it.
    ``context_dim`` must equal the hidden size of the CLIP in ``clip_dir`` (one of that width
    is written when none is given)."""
    torch.manual_seed(seed)
    if clip_dir is None:
        clip_dir = write_tiny_clip(tempfile.mkdtemp(prefix="tiny-clip-"), hidden=context_dim)
    config = sd1_config(clip_dir, model_channels, channel_mult, parameterization, context_dim, num_heads)
    return latent_diffusion(config["model"]["params"]["cond_stage_config"], config["model"]["params"]["unet_config"],
                            parameterization, seed, family="sd1")


def sd1_config(clip_dir: str, model_channels: int = 32, channel_mult: tuple[int, ...] = (1, 2),
               parameterization: str = "eps", context_dim: int = 32, num_heads: int = 2) -> dict[str, Any]:
    """The tiny SD1 model as an ldm yaml config holds it (``model: {target, params}``), its
    text encoder read from ``clip_dir``."""
    cond_stage = {"target": _CLIP_TARGET, "params": {"version": clip_dir, "device": "cpu"}}
    unet = unet_config(model_channels, channel_mult, context_dim, num_heads=num_heads)
    return {"model": latent_diffusion_config(cond_stage, unet, parameterization)}


def latent_diffusion_config(cond_stage_config: dict[str, Any], unet: dict[str, Any],
                            parameterization: str) -> dict[str, Any]:
    """An SD-schedule ``LatentDiffusion`` with the tiny VAE, as ``{target, params}``."""
    return {"target": _LDM_TARGET, "params": {
        "first_stage_config": vae_config(), "cond_stage_config": cond_stage_config, "unet_config": unet,
        "conditioning_key": "crossattn", "cond_stage_key": "txt", "first_stage_key": "jpg",
        "image_size": 8, "channels": 4, "timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012,
        "scale_factor": 0.18215, "use_ema": False, "monitor": None, "parameterization": parameterization,
    }}


def write_tiny_checkpoint(folder: str, seed: int = 0, clip_dir: str | None = None, model_channels: int = 32) -> str:
    """``folder/tiny-sd1.safetensors`` with its ldm config ``tiny-sd1.yaml`` beside it (whose
    text encoder is read from ``clip_dir``, written in ``folder/clip`` when not given): a
    checkpoint headless runs load as they load a real one. Returns the checkpoint's path."""
    import safetensors.torch
    from omegaconf import OmegaConf

    os.makedirs(folder, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same text encoder every time, too
        clip_dir = clip_dir or write_tiny_clip(os.path.join(folder, "clip"))
    model = build_tiny_sd1(seed=seed, clip_dir=clip_dir, model_channels=model_channels)
    path = os.path.join(folder, "tiny-sd1.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    OmegaConf.save(OmegaConf.create(sd1_config(clip_dir, model_channels)), os.path.join(folder, "tiny-sd1.yaml"))
    return path


def latent_diffusion(cond_stage_config: dict[str, Any], unet: dict[str, Any], parameterization: str,
                     seed: int, family: str):
    """An SD-schedule ``LatentDiffusion`` with the tiny VAE, set up as A1111 holds it: eval
    mode, no zero-initialised weights, and the ``is_sd1``/``is_sd2``/``is_sdxl`` flags."""
    from ldm.util import instantiate_from_config

    model = instantiate_from_config(latent_diffusion_config(cond_stage_config, unet, parameterization))
    randomise_zero_inits(model, seed)
    model.eval()
    model.is_sd1, model.is_sd2, model.is_sdxl = family == "sd1", family == "sd2", False
    return model
