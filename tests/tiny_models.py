"""Tiny SD2 and SDXL models for the tests and benchmarks (random weights, CPU, seconds).

SD2 is ldm's ``LatentDiffusion`` with an OpenCLIP text tower; SDXL is a stand-in for sgm's
``DiffusionEngine`` (sgm is on no package registry) built from ldm's blocks. Both reuse the
tiny UNet/VAE/CLIP parts of the shipped ``lora_dreambooth.tiny`` (which the demo uses).
Benchmarks import this module as ``tests.tiny_models`` with the repository root on ``sys.path``.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import torch

from lora_dreambooth.tiny import latent_diffusion, randomise_zero_inits, unet_config, vae_config, write_tiny_clip

_OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"

#: Name the tiny OpenCLIP architecture is registered under with ``open_clip.add_model_config``.
TINY_OPENCLIP_ARCH = "lora-dreambooth-tiny-openclip"


def _tiny_openclip_config(width: int, layers: int, heads: int) -> dict[str, Any]:
    """An OpenCLIP model config shaped like SD2's ViT-H-14 text tower at a tiny width.

    The vocabulary stays 49408 because ``open_clip.tokenize`` (which ldm's embedder calls)
    always uses OpenCLIP's bundled BPE vocabulary. The vision tower is the smallest that
    builds: ldm's embedder deletes it right away."""
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads,
                     "layers": layers},
    }


def _register_tiny_openclip(width: int, layers: int, heads: int) -> str:
    """Register the tiny architecture with open_clip (once per shape) and return its name."""
    import open_clip

    arch = f"{TINY_OPENCLIP_ARCH}-w{width}-l{layers}-h{heads}"
    if open_clip.get_model_config(arch) is None:
        folder = tempfile.mkdtemp(prefix="tiny-openclip-")
        path = os.path.join(folder, arch + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_tiny_openclip_config(width, layers, heads), f)
        open_clip.add_model_config(path)
    return arch


def build_tiny_sd2(seed: int = 0, parameterization: str = "v", model_channels: int = 32,
                   channel_mult: tuple[int, ...] = (1, 2), text_width: int = 32, text_layers: int = 3):
    """A tiny SD2-layout ``LatentDiffusion`` on CPU in fp32, in eval mode as A1111 holds it.

    Like SD 2.x: linear ``proj_in``/``proj_out`` in the transformers, heads of a fixed width
    (``num_head_channels``), v-prediction by default, and ldm's ``FrozenOpenCLIPEmbedder``
    reading the penultimate layer of an OpenCLIP text tower (random weights,
    ``version=None``: nothing is downloaded). Its last text layer is skipped as in SD2."""
    torch.manual_seed(seed)
    unet = unet_config(model_channels, channel_mult, context_dim=text_width, linear_transformer=True)
    unet["params"].update(num_heads=-1, num_head_channels=16)
    arch = _register_tiny_openclip(text_width, text_layers, heads=2)
    cond_stage = {"target": _OPENCLIP_TARGET,
                  "params": {"arch": arch, "version": None, "device": "cpu", "layer": "penultimate"}}
    return latent_diffusion(cond_stage, unet, parameterization, seed, family="sd2")


# --- SDXL --------------------------------------------------------------------------------
#
# sgm (SDXL's code) is on no package registry, so the SDXL stand-in is built from ldm's
# UNet/VAE/CLIP classes (same block classes and module names as sgm's) plus small classes
# named and shaped like sgm's ``DiffusionEngine``, ``GeneralConditioner`` and embedders, with
# the methods A1111 1.10.1 patches in (``modules/sd_models_xl.py``). Module paths match the
# real model for everything a LoRA targets.

#: A1111's size for ``get_learned_conditioning`` when the prompts carry none (sd_models_xl).
A1111_SDXL_DEFAULT_SIZE = 1024
#: A1111's default aesthetic scores for prompts / negative prompts (the "SDXL high / low
#: aesthetic score" options; only a refiner's conditioner reads them).
A1111_AESTHETIC_SCORES = (6.0, 2.5)


def sdxl_unet(model_channels: int = 320, channel_mult: tuple[int, ...] = (1, 2, 4),
              transformer_depth: tuple[int, ...] = (0, 2, 10), context_dim: int = 2048,
              adm_in_channels: int = 2816, num_head_channels: int = 64):
    """An ldm ``UNetModel`` with SDXL's layout (the defaults are SDXL base's full size):
    2 res blocks per level, linear ``proj_in``/``proj_out``, ``transformer_depth[level]``
    transformer blocks on each level (0 = no attention, as SDXL's first level), the middle
    block as deep as the last level, and sgm's ``num_classes="sequential"`` label embedding
    reading the ``vector`` conditioning (``y``) of width ``adm_in_channels``.

    ldm's constructor takes one depth for all levels and no sequential label embedding, so
    both are put in afterwards, as sgm builds them."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    depth = list(transformer_depth)
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
                     num_res_blocks=2, channel_mult=list(channel_mult),
                     attention_resolutions=[2 ** level for level, d in enumerate(depth) if d],
                     num_heads=-1, num_head_channels=num_head_channels, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=context_dim, use_linear_in_transformer=True,
                     use_checkpoint=False, legacy=False)

    def deepen(block: torch.nn.Module, d: int) -> None:
        """Replace the block's one-deep transformer (its second child) by a d-deep one."""
        if d > 1 and len(block) > 1 and isinstance(block[1], SpatialTransformer):
            channels, heads = block[1].in_channels, block[1].transformer_blocks[0].attn1.heads
            block[1] = SpatialTransformer(channels, heads, channels // heads, depth=d,
                                          context_dim=[context_dim] * d, use_linear=True,
                                          use_checkpoint=False)

    levels = len(depth)
    index = 1  # input_blocks[0] is conv_in; a downsample block ends every level but the last
    for level in range(levels):
        for _ in range(2):
            deepen(unet.input_blocks[index], depth[level])
            index += 1
        index += 1
    deepen(unet.middle_block, depth[-1])
    for i, block in enumerate(unet.output_blocks):  # 3 per level, deepest level first
        deepen(block, depth[levels - 1 - i // 3])

    time_embed_dim = model_channels * 4
    unet.num_classes = "sequential"
    unet.adm_in_channels = adm_in_channels
    unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
        torch.nn.Linear(adm_in_channels, time_embed_dim), torch.nn.SiLU(),
        torch.nn.Linear(time_embed_dim, time_embed_dim)))
    return unet


def _sgm_embedder(module: torch.nn.Module, input_key: str) -> None:
    """The attributes sgm's ``GeneralConditioner`` gives every embedder (frozen, no dropout)."""
    module.input_key = input_key
    module.is_trainable = False
    module.ucg_rate = 0.0
    module.legacy_ucg_val = None
    module.requires_grad_(False)
    module.eval()


class FrozenCLIPEmbedder(torch.nn.Module):
    """SDXL's first text encoder (te1) as sd_xl_base.yaml configures sgm's class of this name:
    an HF ``CLIPTextModel`` at ``.transformer``, conditioning from its penultimate hidden
    state (``layer="hidden"``; SDXL: ``layer_idx=11`` of 12 layers), no pooled output."""

    def __init__(self, version: str, layer_idx: int):
        from transformers import CLIPTextModel, CLIPTokenizer

        super().__init__()
        self.tokenizer = CLIPTokenizer.from_pretrained(version)
        self.transformer = CLIPTextModel.from_pretrained(version)
        self.device, self.max_length = "cpu", 77
        self.layer, self.layer_idx, self.return_pooled = "hidden", layer_idx, False
        _sgm_embedder(self, "txt")

    def forward(self, text: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                                return_tensors="pt")["input_ids"].to(self.device)
        return self.transformer(input_ids=tokens, output_hidden_states=True).hidden_states[self.layer_idx]


class FrozenOpenCLIPEmbedder2(torch.nn.Module):
    """SDXL's second text encoder (te2) as sd_xl_base.yaml configures sgm's class of this
    name (``layer="penultimate", always_return_pooled=True, legacy=False``): an OpenCLIP text
    tower at ``.model`` whose ``transformer.resblocks`` have fused ``nn.MultiheadAttention``;
    returns the penultimate layer's output (no final norm) and the pooled output, i.e.
    ``ln_final`` of the last layer at the end-of-text token, projected."""

    def __init__(self, arch: str):
        import open_clip

        super().__init__()
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        del model.visual
        self.model = model
        self.device = "cpu"
        self.layer, self.layer_idx = "penultimate", 1
        self.return_pooled, self.legacy = True, False
        _sgm_embedder(self, "txt")

    def forward(self, text: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        import open_clip

        tokens = open_clip.tokenize(text).to(self.device)
        hidden = self.encode_with_transformer(tokens)
        return hidden[self.layer], hidden["pooled"]

    def encode_with_transformer(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.model.token_embedding(tokens) + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND, as OpenCLIP 2.20's resblocks take it
        out: dict[str, torch.Tensor] = {}
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                out["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        out["last"] = x.permute(1, 0, 2)
        last = self.model.ln_final(out["last"])
        out["pooled"] = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ self.model.text_projection
        return out


class ConcatTimestepEmbedderND(torch.nn.Module):
    """sgm's size/crop embedder: each of a sample's numbers (e.g. height and width) as a
    sinusoidal embedding of ``outdim`` values, concatenated (SDXL: 2 × 256 per embedder)."""

    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.outdim = outdim
        _sgm_embedder(self, input_key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ldm.modules.diffusionmodules.util import timestep_embedding

        if x.ndim == 1:
            x = x[:, None]
        n = x.shape[0]
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(n, -1)


class GeneralConditioner(torch.nn.Module):
    """sgm's conditioner: runs each embedder on ``batch[embedder.input_key]`` (without
    gradients unless the embedder is trainable) and concatenates the outputs by rank:
    3-D → ``crossattn`` (along features), 2-D → ``vector``; an embedder whose input key is in
    ``force_zero_embeddings`` contributes zeros."""

    KEYS_BY_RANK = {2: "vector", 3: "crossattn"}
    CAT_DIM = {"vector": 1, "crossattn": 2}

    def __init__(self, embedders: list[torch.nn.Module]):
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)

    def forward(self, batch: dict, force_zero_embeddings: list[str] | None = None) -> dict[str, torch.Tensor]:
        zeroed = force_zero_embeddings or []
        out: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            with contextlib.nullcontext() if embedder.is_trainable else torch.no_grad():
                result = embedder(batch[embedder.input_key])
            for emb in result if isinstance(result, (list, tuple)) else [result]:
                key = self.KEYS_BY_RANK[emb.dim()]
                if embedder.input_key in zeroed:
                    emb = torch.zeros_like(emb)
                out[key] = torch.cat((out[key], emb), self.CAT_DIM[key]) if key in out else emb
        return out


class OpenAIWrapper(torch.nn.Module):
    """sgm's ``DiffusionEngine.model``: hands the conditioning dict to the UNet as ``context``
    (crossattn) and ``y`` (vector)."""

    def __init__(self, diffusion_model: torch.nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"))


class DiffusionEngine(torch.nn.Module):
    """The SDXL model as A1111 1.10.1 holds it after loading (sgm's class of this name with
    ``sd_models_xl``'s patched methods and ``extend_sdxl``'s attributes), before A1111's
    prompt hijack wraps the text embedders."""

    def __init__(self, unet: torch.nn.Module, conditioner: GeneralConditioner,
                 first_stage_model: torch.nn.Module, scale_factor: float = 0.13025):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.conditioner = conditioner
        self.conditioner.wrapped = torch.nn.Module()  # extend_sdxl adds this empty module
        first_stage_model.requires_grad_(False)
        self.first_stage_model = first_stage_model.eval()
        self.scale_factor = scale_factor
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl = False, False, True
        self.is_ssd = self.is_sdxl_inpaint = False
        # sgm's LegacyDDPMDiscretization (SD's scaled-linear betas); a plain attribute, not a
        # buffer, as extend_sdxl sets it. sgm has no ``betas``.
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()

    def get_learned_conditioning(self, batch: list[str]) -> dict[str, torch.Tensor]:
        """A1111's: sizes from the prompts' ``width``/``height`` (1024 when absent), crop
        (0, 0), and zero text embeddings for an all-empty negative prompt batch."""
        width = getattr(batch, "width", None) or A1111_SDXL_DEFAULT_SIZE
        height = getattr(batch, "height", None) or A1111_SDXL_DEFAULT_SIZE
        negative = getattr(batch, "is_negative_prompt", False)
        n = len(batch)
        size = torch.tensor([height, width], dtype=torch.float32).repeat(n, 1)
        conds = {"txt": batch, "original_size_as_tuple": size,
                 "crop_coords_top_left": torch.zeros(n, 2), "target_size_as_tuple": size,
                 "aesthetic_score": torch.tensor([A1111_AESTHETIC_SCORES[negative]]).repeat(n, 1)}
        zero = negative and all(prompt == "" for prompt in batch)
        return self.conditioner(conds, force_zero_embeddings=["txt"] if zero else [])

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.model(x, t, cond)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        """sgm's: a sampled latent, already scaled (an ldm VAE stands in for sgm's)."""
        return self.scale_factor * self.first_stage_model.encode(x).sample()

    def get_first_stage_encoding(self, x: torch.Tensor) -> torch.Tensor:
        return x  # A1111: SDXL's encode_first_stage does everything

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)


#: ``sdxl_unet`` arguments of the tiny SDXL: three levels of 1, 2, 3 × 32 channels, one
#: transformer block on each of the two deeper ones, heads of 16 channels.
TINY_SDXL_UNET = {"model_channels": 32, "channel_mult": (1, 2, 3), "transformer_depth": (0, 1, 1),
                  "num_head_channels": 16}


def build_tiny_sdxl(seed: int = 0, clip_dir: str | None = None, te1: tuple[int, int, int] = (32, 2, 2),
                    te2: tuple[int, int, int] = (32, 2, 2), size_embedding: int = 16,
                    unet: dict[str, Any] | None = None,
                    vae: torch.nn.Module | None = None) -> DiffusionEngine:
    """A tiny SDXL-layout :class:`DiffusionEngine` on CPU in fp32, in eval mode as A1111 holds it.

    Like SDXL base: three UNet levels, each wider than the one before (1, 2, 3 × 32 channels;
    SDXL: 1, 2, 4 × 320), attention on the two deeper ones, so the blocks sit at SDXL's indices;
    ``context_dim`` = te1 width + te2 width; ``vector`` = te2's pooled output ‖ embeddings of
    original size, crop and target size (``adm_in_channels`` = te2 width + 3 × 2 ×
    ``size_embedding``); eps-prediction, scale factor 0.13025. ``te1`` and ``te2`` are the text
    encoders' (width, layers, heads); te1 reads its penultimate layer (``clip_dir`` must hold a
    CLIP of te1's shape; one is written when none is given). ``unet``: ``sdxl_unet``'s other
    arguments (default ``TINY_SDXL_UNET``; ``{}``: SDXL base's); ``vae``: the tiny VAE when None.
    The benchmarks build the full-size model with these (``bench/full_size.sdxl_model``)."""
    from ldm.models.autoencoder import AutoencoderKL

    (te1_width, te1_layers, te1_heads), (te2_width, te2_layers, te2_heads) = te1, te2
    torch.manual_seed(seed)
    if clip_dir is None:
        clip_dir = write_tiny_clip(tempfile.mkdtemp(prefix="tiny-clip-"), hidden=te1_width,
                                   layers=te1_layers, heads=te1_heads)
    arch = _register_tiny_openclip(te2_width, te2_layers, te2_heads)
    conditioner = GeneralConditioner([
        FrozenCLIPEmbedder(clip_dir, layer_idx=te1_layers - 1),
        FrozenOpenCLIPEmbedder2(arch),
        ConcatTimestepEmbedderND(size_embedding, "original_size_as_tuple"),
        ConcatTimestepEmbedderND(size_embedding, "crop_coords_top_left"),
        ConcatTimestepEmbedderND(size_embedding, "target_size_as_tuple"),
    ])
    unet = sdxl_unet(context_dim=te1_width + te2_width, adm_in_channels=te2_width + 3 * 2 * size_embedding,
                     **(TINY_SDXL_UNET if unet is None else unet))
    if vae is None:
        vae = AutoencoderKL(**vae_config()["params"])
    model = DiffusionEngine(unet, conditioner, vae)
    randomise_zero_inits(model, seed)
    model.eval()
    return model
