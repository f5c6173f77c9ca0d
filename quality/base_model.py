"""The quality world's base model: an SD1-architecture ldm ``LatentDiffusion`` (UNet with
cross-attention, ``AutoencoderKL`` with SD's 8× downsampling and 4 latent channels,
``FrozenCLIPEmbedder`` with CLIP's real BPE tokenizer and a small text transformer), saved
the way A1111 reads a checkpoint: one ``.safetensors`` with ldm keys and a ``.yaml`` beside it.

The CLIP folder the yaml names holds the text model's ``config.json`` and CLIP's tokenizer
files (built from the BPE merges open_clip ships, identical to openai/clip-vit-large-patch14's).
It holds no weights: those are in the checkpoint under ``cond_stage_model.transformer.``, and
the model is built as A1111 builds it (``CLIPTextModel`` from its config, then the state dict).
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import json
import os
from typing import Any

import torch

from lora_dreambooth.checkpoint import load_checkpoint, text_models_from_config
from lora_dreambooth.tiny import _bytes_to_unicode

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "model")
CHECKPOINT = os.path.join(MODEL_DIR, "shapes-sd1.safetensors")
JUDGE = os.path.join(MODEL_DIR, "judge.safetensors")
CLIP_DIR = os.path.join(MODEL_DIR, "clip")

TEXT_WIDTH = 64
CLIP_CONFIG = {"vocab_size": 49408, "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH,
               "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
               "projection_dim": TEXT_WIDTH, "hidden_act": "quick_gelu",
               "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def write_clip_folder(folder: str = CLIP_DIR) -> str:
    """CLIP's tokenizer (vocab.json, merges.txt as in openai/clip-vit-large-patch14) and the
    small text model's config.json, in ``folder``."""
    import open_clip
    from transformers import CLIPTextConfig

    os.makedirs(folder, exist_ok=True)
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True}, f)
    CLIPTextConfig(**CLIP_CONFIG).save_pretrained(folder)
    return folder


def model_config(scale_factor: float = 0.18215, clip_dir: str = CLIP_DIR) -> dict[str, Any]:
    """The checkpoint's yaml (A1111's ``v1-inference.yaml`` layout) at this world's size."""
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
            "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": scale_factor, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                "attention_resolutions": [1, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 2],
                "num_heads": 4, "use_spatial_transformer": True, "transformer_depth": 1,
                "context_dim": TEXT_WIDTH, "use_checkpoint": False, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                             "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                             "attn_resolutions": [], "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": clip_dir, "device": "cpu"}},
        }}}


def build(config: dict[str, Any]) -> torch.nn.Module:
    """The model of ``config`` (a yaml dict) with fresh weights, as A1111 holds it: eval mode,
    nothing trainable, the ``is_sd1`` flags set."""
    from ldm.util import instantiate_from_config

    with text_models_from_config():
        model = instantiate_from_config(copy.deepcopy(config["model"]))
    model.eval().requires_grad_(False)
    model.is_sd1, model.is_sd2, model.is_sdxl = True, False, False
    return model


def _yaml_path(checkpoint: str) -> str:
    return os.path.splitext(checkpoint)[0] + ".yaml"


def save(model: torch.nn.Module, config: dict[str, Any], checkpoint: str = CHECKPOINT) -> None:
    """``checkpoint`` (fp16 weights, fp32 schedule buffers, ldm keys) and its ``.yaml``, each
    written atomically. The yaml names the CLIP folder relative to the checkpoint's folder."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    state = {}
    for key, value in model.state_dict().items():
        keep_fp32 = not key.startswith(("model.", "first_stage_model.", "cond_stage_model."))
        state[key] = (value if keep_fp32 or not value.is_floating_point() else value.half()).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
    tmp = checkpoint + ".tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, checkpoint)
    relative = copy.deepcopy(config)
    relative["model"]["params"]["cond_stage_config"]["params"]["version"] = os.path.relpath(
        config["model"]["params"]["cond_stage_config"]["params"]["version"], os.path.dirname(checkpoint))
    tmp = _yaml_path(checkpoint) + ".tmp"
    OmegaConf.save(OmegaConf.create(relative), tmp)
    os.replace(tmp, _yaml_path(checkpoint))


def load(checkpoint: str = CHECKPOINT, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The saved model as the headless trainer loads a checkpoint (``load_checkpoint``, as A1111
    does), run from the checkpoint's folder so that the yaml's relative CLIP folder resolves.
    With a half ``dtype`` the UNet's and the text encoder's Linear and Conv2d weights take it
    (A1111 halves the model; on the CPU, where this runs, only those layers compute in bf16, as
    in ``tests/test_train.py``); norms, the VAE and the schedule stay fp32."""
    with contextlib.chdir(os.path.dirname(os.path.abspath(checkpoint))):
        model = load_checkpoint(os.path.basename(checkpoint))
    if dtype != torch.float32:
        for part in (model.model, model.cond_stage_model):
            for module in part.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    module.to(dtype)
    return model
