"""Which modules of an ldm/sgm model get adapters, and the kohya name of each.

The names are what kohya sd-scripts writes and A1111's Lora extension reads: for the SD1/SD2
UNet, ``lora_unet_`` + the *diffusers* path of the module (``down_blocks_0_attentions_0_...``),
for the text encoder ``lora_te_`` + the HF ``CLIPTextModel`` path
(``text_model_encoder_layers_<i>_self_attn_q_proj``). A1111 holds the model in ldm (compvis)
layout, so every ldm module is given the diffusers name of its counterpart.

SDXL (sgm ``DiffusionEngine``): kohya names the UNet by its compvis path
(``lora_unet_input_blocks_4_1_proj_in``, which A1111 resolves under ``diffusion_model``) and
the two text encoders ``lora_te1_`` (HF CLIP ViT-L, ``conditioner.embedders.0``) and
``lora_te2_`` (OpenCLIP bigG, ``conditioner.embedders.1``), both under HF layer names.

The compvis → diffusers block mapping is read from the UNet itself (levels, res blocks per
level, which blocks carry a transformer), not from SD1.5's numbers. A1111 maps the names back
with hard-coded factors (3 input blocks per level, upsampler at index 1 in the first up
block), which agree with this mapping for every real SD1/SD2 model (2 res blocks per level,
no attention on the deepest level).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import networks


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


#: ldm ResBlock child → diffusers ResnetBlock2D child (the only Linear/Conv2d it has).
_RESBLOCK_NAMES = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

#: OpenCLIP residual block child → HF CLIP encoder layer child (SD2 text encoder).
_OPENCLIP_MLP_NAMES = {"mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}
_QKV = ("q_proj", "k_proj", "v_proj")


def find_targets(model: nn.Module, network: str = "lora",
                 train_text_encoder: bool = False) -> list[Target]:
    """The modules kohya sd-scripts adapts in an ldm ``LatentDiffusion`` (SD1 or SD2) or an
    sgm ``DiffusionEngine`` (SDXL base).

    Every network type adapts each Linear and 1×1 Conv2d inside the UNet's SpatialTransformers;
    the types with ``convs`` (``networks``: LoCon, LoHa, LoKr, DoRA) add the ResBlock
    Linear/Conv2d modules and the down/up-sample convolutions (``locon_only=True``). With
    ``train_text_encoder`` the text encoder's attention projections and MLP layers are added
    (``part="te"``).

    SD2 text encoder (OpenCLIP): q/k/v live in one fused ``nn.MultiheadAttention.in_proj``,
    so the three q/k/v targets of a layer share the path of that ``MultiheadAttention``;
    :func:`fused_qkv_index` says which third of ``in_proj_weight`` each one is. The layers
    the conditioning skips (the last one for "penultimate") are not targets.

    SDXL: the same kinds of UNet modules under compvis names, and both text encoders with
    every layer, as kohya adapts them (te2's last layer feeds the pooled output; te1's last
    layer, which the "hidden" conditioning skips, is adapted by kohya too and simply gets no
    gradient). te2's attention is fused like SD2's.
    """
    convs = networks.get(network).convs
    unet = model.get_submodule("model.diffusion_model")
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        targets = _compvis_unet_targets(unet, "model.diffusion_model")
        # Named (and checked to be SDXL base's) even when they are not trained.
        te_targets = [t for prefix, path, embedder in sdxl_text_encoders(model)
                      for t in _embedder_targets(embedder, path, prefix, skipped_layers=0)]
    else:
        targets = _unet_targets(unet, "model.diffusion_model")
        te_targets = _te_targets(model) if train_text_encoder else []
    if not convs:
        targets = [t for t in targets if not t.locon_only]
    return targets + te_targets if train_text_encoder else targets


def fused_qkv_index(target: Target) -> int | None:
    """0/1/2 if ``target`` is the q/k/v slice of a fused ``in_proj`` (SD2 text encoder), whose
    rows ``[i*d, (i+1)*d)`` of ``in_proj_weight`` it adapts; None for an ordinary module."""
    if target.part != "te" or not target.path.endswith(".attn"):
        return None
    for i, suffix in enumerate(_QKV):
        if target.kohya_name.endswith("_" + suffix):
            return i
    return None


# --- UNet -------------------------------------------------------------------------------

def _unet_targets(unet: nn.Module, prefix: str) -> list[Target]:
    """Walk input/middle/output blocks, naming each block's children the diffusers way."""
    res_per_level = _res_blocks_per_level(unet)
    levels = len(res_per_level)
    out: list[Target] = []

    # input_blocks[0] is conv_in (kohya never targets it); then per level: one block per
    # res block, and a downsample block after every level but the last.
    idx = 1
    for level in range(levels):
        for j in range(res_per_level[level]):
            out += _block_targets(unet.input_blocks[idx], f"{prefix}.input_blocks.{idx}",
                                  f"down_blocks_{level}", j)
            idx += 1
        if level != levels - 1:
            out += _block_targets(unet.input_blocks[idx], f"{prefix}.input_blocks.{idx}",
                                  f"down_blocks_{level}", 0)
            idx += 1
    _expect(idx == len(unet.input_blocks), "input_blocks")

    # middle_block: ResBlock, SpatialTransformer, ResBlock → resnets_0, attentions_0, resnets_1.
    counts = {"ResBlock": 0, "SpatialTransformer": 0}
    for k, child in enumerate(unet.middle_block):
        kind = type(child).__name__
        _expect(kind in counts, f"middle_block.{k} ({kind})")
        out += _child_targets(child, f"{prefix}.middle_block.{k}", "mid_block", counts[kind])
        counts[kind] += 1

    # output_blocks: up block i is level (levels-1-i), with res_per_level+1 blocks; the last
    # block of every up block but the last ends with an Upsample.
    idx = 0
    for i in range(levels):
        for j in range(res_per_level[levels - 1 - i] + 1):
            out += _block_targets(unet.output_blocks[idx], f"{prefix}.output_blocks.{idx}",
                                  f"up_blocks_{i}", j)
            idx += 1
    _expect(idx == len(unet.output_blocks), "output_blocks")
    return out


def _res_blocks_per_level(unet: nn.Module) -> list[int]:
    n = unet.num_res_blocks
    if isinstance(n, int):
        return [n] * len(unet.channel_mult)
    return list(n)


def _block_targets(block: nn.Module, path: str, diffusers_block: str, j: int) -> list[Target]:
    """Targets of one ``TimestepEmbedSequential``: the j-th res block of a diffusers block,
    its attention, and/or its down/up-sampler."""
    out: list[Target] = []
    for k, child in enumerate(block):
        out += _child_targets(child, f"{path}.{k}", diffusers_block, j)
    return out


def _child_targets(child: nn.Module, path: str, diffusers_block: str, j: int) -> list[Target]:
    kind = type(child).__name__
    out: list[Target] = []
    for name, locon_only in _block_modules(child, path):
        if kind == "SpatialTransformer":  # children are named exactly as in diffusers' Transformer2DModel
            diffusers = f"{diffusers_block}_attentions_{j}_{name}"
        elif kind == "ResBlock":
            diffusers = f"{diffusers_block}_resnets_{j}_{_RESBLOCK_NAMES[name]}"
        else:  # Downsample.op / Upsample.conv
            sampler = "downsamplers" if kind == "Downsample" else "upsamplers"
            diffusers = f"{diffusers_block}_{sampler}_0_conv"
        out.append(_unet_target(diffusers, f"{path}.{name}", locon_only))
    return out


def _block_modules(child: nn.Module, path: str) -> list[tuple[str, bool]]:
    """``(name inside child, locon_only)`` of each Linear/Conv2d kohya adapts in one child of
    a UNet block: everything in a SpatialTransformer (LoCon-only for spatial convolutions),
    the ResBlock layers and the down/up-sample convolution (LoCon-only)."""
    kind = type(child).__name__
    modules = _linear_or_conv(child)
    if kind == "SpatialTransformer":
        return [(name, _is_spatial_conv(m)) for name, m in modules]
    if kind == "ResBlock":
        for name, _ in modules:
            _expect(name in _RESBLOCK_NAMES, f"{path}.{name}")
        return [(name, True) for name, _ in modules]
    if kind in ("Downsample", "Upsample"):
        return [(name, True) for name, _ in modules]  # Downsample.op / Upsample.conv, if a conv
    raise ValueError(f"unexpected UNet block {kind} at {path}: not a Stable Diffusion UNet layout")


def _compvis_unet_targets(unet: nn.Module, prefix: str) -> list[Target]:
    """SDXL: kohya names each module by its path under ``diffusion_model``
    (``input_blocks.4.1.proj_in`` → ``lora_unet_input_blocks_4_1_proj_in``). ``input_blocks.0``
    (conv_in), the time/label embeddings and the output layer are not targets."""
    blocks = [(f"input_blocks.{i}", block) for i, block in enumerate(unet.input_blocks) if i > 0]
    blocks.append(("middle_block", unet.middle_block))
    blocks += [(f"output_blocks.{i}", block) for i, block in enumerate(unet.output_blocks)]
    out: list[Target] = []
    for block_path, block in blocks:
        for k, child in enumerate(block):
            local = f"{block_path}.{k}"
            out += [_unet_target(f"{local}.{name}", f"{prefix}.{local}.{name}", locon_only)
                    for name, locon_only in _block_modules(child, f"{prefix}.{local}")]
    return out


def _unet_target(name: str, path: str, locon_only: bool) -> Target:
    return Target(kohya_name="lora_unet_" + name.replace(".", "_"), path=path,
                  part="unet", locon_only=locon_only)


def _linear_or_conv(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules()
            if name and isinstance(m, (nn.Linear, nn.Conv2d))]


def _is_spatial_conv(module: nn.Module) -> bool:
    """kohya's plain LoRA takes Linear and 1×1 convs only; larger kernels need conv_dim."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _expect(ok: bool, where: str) -> None:
    if not ok:
        raise ValueError(f"unexpected UNet layout at {where}: not a Stable Diffusion UNet")


# --- text encoder -----------------------------------------------------------------------

def _te_targets(model: nn.Module) -> list[Target]:
    """A1111 wraps the embedder (``cond_stage_model.wrapped``); a plain ldm model does not."""
    embedder_path = "cond_stage_model"
    embedder = model.get_submodule(embedder_path)
    if hasattr(embedder, "wrapped"):
        embedder_path += ".wrapped"
        embedder = embedder.wrapped
    skipped = int(getattr(embedder, "layer_idx", 1)) if is_openclip(embedder) else 0
    return _embedder_targets(embedder, embedder_path, "lora_te_", skipped)


def sdxl_text_encoders(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(kohya prefix, path, embedder)`` of SDXL's two text encoders: the HF CLIP at
    ``conditioner.embedders.0`` (te1) and the OpenCLIP at ``conditioner.embedders.1`` (te2),
    each under A1111's ``.wrapped`` when A1111 has wrapped it."""
    embedders = getattr(getattr(model, "conditioner", None), "embedders", None)
    found: list[tuple[str, str, nn.Module]] = []
    for index, (prefix, kind) in enumerate((("lora_te1_", is_hf_clip), ("lora_te2_", is_openclip))):
        path = f"conditioner.embedders.{index}"
        embedder = embedders[index] if embedders is not None and len(embedders) > index else None
        if embedder is not None and hasattr(embedder, "wrapped"):
            path += ".wrapped"
            embedder = embedder.wrapped
        if embedder is None or not kind(embedder):
            raise NotImplementedError(
                "only SDXL base models are supported: expected the HF CLIP text encoder at "
                "conditioner.embedders.0 and the OpenCLIP one at conditioner.embedders.1")
        found.append((prefix, path, embedder))
    return found


def is_hf_clip(embedder: nn.Module) -> bool:
    return hasattr(getattr(embedder, "transformer", None), "text_model")


def is_openclip(embedder: nn.Module) -> bool:
    return hasattr(getattr(getattr(embedder, "model", None), "transformer", None), "resblocks")


def _embedder_targets(embedder: nn.Module, path: str, prefix: str, skipped_layers: int) -> list[Target]:
    """Targets of one text embedder (HF CLIP or OpenCLIP) at ``path``, named ``prefix`` + the
    HF layer path; ``skipped_layers`` OpenCLIP layers at the end are left out."""
    if is_hf_clip(embedder):
        return _hf_clip_targets(embedder.transformer, path + ".transformer", prefix)
    if is_openclip(embedder):
        return _openclip_targets(embedder.model.transformer, path + ".model.transformer", prefix,
                                 skipped_layers)
    raise NotImplementedError(
        f"text-encoder training is not supported for {type(embedder).__name__}")


def _hf_clip_targets(transformer: nn.Module, path: str, prefix: str) -> list[Target]:
    """SD1 / SDXL te1: every Linear in the CLIPAttention and CLIPMLP modules of the HF
    CLIPTextModel."""
    out: list[Target] = []
    for name, module in transformer.named_modules():
        if not any(type(module).__name__.startswith(c) for c in ("CLIPAttention", "CLIPSdpa",
                                                                 "CLIPFlash", "CLIPMLP")):
            continue
        for child, _ in _linear_or_conv(module):
            full = f"{name}.{child}"
            out.append(Target(kohya_name=prefix + full.replace(".", "_"),
                              path=f"{path}.{full}", part="te"))
    return out


def _openclip_targets(transformer: nn.Module, path: str, prefix: str, skipped: int) -> list[Target]:
    """SD2 / SDXL te2: OpenCLIP resblocks under kohya's HF names. SD2: layers past the one the
    conditioning reads (``layer_idx`` from the end) get no gradient and kohya's converted model
    lacks them; SDXL's te2 uses every layer (the pooled output reads the last)."""
    out: list[Target] = []
    blocks = transformer.resblocks
    for i in range(len(blocks) - skipped):
        attn = blocks[i].attn
        if not (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim):
            raise NotImplementedError("text-encoder training on OpenCLIP needs a fused in_proj "
                                      f"MultiheadAttention at resblocks.{i}.attn")
        base = f"{prefix}text_model_encoder_layers_{i}_"
        block_path = f"{path}.resblocks.{i}"
        out += [Target(base + "self_attn_" + p, f"{block_path}.attn", "te") for p in _QKV]
        out.append(Target(base + "self_attn_out_proj", f"{block_path}.attn.out_proj", "te"))
        out += [Target(base + kohya, f"{block_path}.{name}", "te")
                for name, kohya in _OPENCLIP_MLP_NAMES.items()]
    return out


__all__ = ["Target", "find_targets", "fused_qkv_index"]
