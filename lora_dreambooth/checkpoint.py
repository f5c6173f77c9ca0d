"""A checkpoint loaded outside A1111 with the model classes A1111 uses, for headless runs.

With an A1111 install (``webui``), the classes come from its ``repositories/`` — ldm from
``stable-diffusion-stability-ai``, sgm from ``generative-models`` — and the config from its
``configs/`` (or the repositories' ones), picked from the weights as A1111 1.10.1's
``sd_models_config`` picks them; without one, from the ``ldm`` package this environment has
(SD 1.x/2.x), with the config beside the checkpoint. A ``<checkpoint>.yaml`` beside the
checkpoint wins in both cases, as in A1111. Weights are read with safetensors only: a
``.ckpt`` is a pickle and is never opened.

The model ends as A1111 holds it: weights loaded, eval mode, ``is_sd1``/``is_sd2``/``is_sdxl``
set, on ``device``; on CUDA the UNet and text encoders in fp16 unless ``half`` is off (A1111's
``--no-half``), the VAE in fp32 (A1111's ``--no-half-vae``) and ``alphas_cumprod`` in fp32.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from typing import Iterator, Optional

import safetensors
import torch

#: A1111 1.10.1's config files, relative to its install (``modules/sd_models_config.py``).
SD1_CONFIG = os.path.join("configs", "v1-inference.yaml")
SD2_CONFIG = os.path.join("repositories", "stable-diffusion-stability-ai", "configs", "stable-diffusion",
                          "v2-inference.yaml")
SDXL_CONFIG = os.path.join("repositories", "generative-models", "configs", "inference", "sd_xl_base.yaml")
#: Where A1111 keeps ldm and sgm.
REPOSITORIES = (os.path.join("repositories", "stable-diffusion-stability-ai"),
                os.path.join("repositories", "generative-models"))

#: Old SD1 checkpoints name the CLIP text model's parts without ``text_model.`` (A1111's
#: ``checkpoint_dict_replacements_sd1``).
_SD1_RENAMES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


class CheckpointError(ValueError):
    """The checkpoint cannot be read or trained here (the message says why and what to do)."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read with safetensors (never unpickled)."""
    return _read(path, lambda f, key: f.get_tensor(key))


def inspect(path: str) -> str:
    """The checkpoint's family ("sd1", "sd2", "sdxl") from its header alone (see
    :func:`model_family`): what a run checks before it starts anything."""
    shapes = _read(path, lambda f, key: torch.empty(f.get_slice(key).get_shape(), device="meta"))
    return model_family(shapes)


def _read(path: str, get) -> dict[str, torch.Tensor]:
    if not path.lower().endswith(".safetensors"):
        raise CheckpointError(f"{path}: only .safetensors checkpoints are read (a .ckpt is a pickle, which "
                              "this trainer never opens); convert it to .safetensors first")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safetensors.safe_open(path, "pt") as f:
            tensors = {key: get(f, key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return {_rename(key): value for key, value in tensors.items()}


def _rename(key: str) -> str:
    for old, new in _SD1_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def model_family(state_dict: dict[str, torch.Tensor]) -> str:
    """"sd1", "sd2" or "sdxl" as A1111 tells them apart; :class:`CheckpointError` for the
    families it loads but this trainer does not train."""
    unet_input = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
    if "conditioner.embedders.1.model.ln_final.weight" in state_dict:
        family = "sdxl"
    elif "conditioner.embedders.0.model.ln_final.weight" in state_dict:
        raise CheckpointError("SDXL refiners cannot be trained: use an SDXL base checkpoint")
    elif "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state_dict:
        family = "sd2"
    elif "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state_dict:
        family = "sd1"
    else:
        raise CheckpointError("not an SD 1.x, SD 2.x or SDXL checkpoint (no text encoder this trainer knows)")
    if unet_input is None:
        raise CheckpointError("the checkpoint has no UNet (model.diffusion_model.*)")
    if unet_input.shape[1] != 4:
        raise CheckpointError("inpainting / instruct checkpoints (UNet with more than 4 input channels) "
                              "cannot be trained: use a base checkpoint")
    return family


def config_path(checkpoint: str, family: str, webui: Optional[str]) -> str:
    """``<checkpoint>.yaml`` beside it, else (with ``webui``) the A1111 config of ``family``."""
    beside = os.path.splitext(checkpoint)[0] + ".yaml"
    if os.path.isfile(beside):
        return beside
    if webui is None:
        raise CheckpointError(f"no config for {checkpoint}: put its yaml beside it ({beside}) or pass "
                              "--webui with your A1111 folder")
    path = os.path.join(webui, {"sd1": SD1_CONFIG, "sd2": SD2_CONFIG, "sdxl": SDXL_CONFIG}[family])
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: is {webui} an A1111 1.10 folder that has started once?")
    return path


def use_webui(webui: str) -> None:
    """Import ldm and sgm from the A1111 install ``webui``, as A1111 does."""
    missing = [folder for folder in REPOSITORIES if not os.path.isdir(os.path.join(webui, folder))]
    if missing:
        raise CheckpointError(f"{webui} is not an A1111 folder that has started once: "
                              f"{', '.join(missing)} missing")
    for folder in reversed(REPOSITORIES):
        path = os.path.abspath(os.path.join(webui, folder))
        if path not in sys.path:
            sys.path.insert(0, path)
    for name in ("ldm", "sgm"):
        module = sys.modules.get(name)
        if module is not None and not os.path.abspath(module.__file__ or "").startswith(os.path.abspath(webui)):
            raise CheckpointError(f"'{name}' was already imported from {module.__file__}, not from {webui}")


def load_checkpoint(path: str, webui: Optional[str] = None, device: Optional[torch.device] = None,
                    half: bool = True) -> torch.nn.Module:
    """The model of the checkpoint at ``path`` as A1111 holds it (see the module doc).
    Raises :class:`CheckpointError` with what to do when it cannot."""
    if webui is not None:
        use_webui(webui)
    state_dict = read_state_dict(path)
    family = model_family(state_dict)
    config = config_path(path, family, webui)
    model = _instantiate(config, family)
    try:
        missing, _unexpected = model.load_state_dict(state_dict, strict=False)  # unexpected: EMA weights etc.
    except RuntimeError as error:  # shapes that do not fit
        raise CheckpointError(f"{path} does not fit {config}: {str(error).splitlines()[-1].strip()}") from None
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"{path} does not fit {config}: {len(missing)} weights missing, "
                              f"e.g. {', '.join(missing[:3])}")
    del state_dict
    if family == "sd2" and getattr(model, "parameterization", "eps") == "eps" and _predicts_v(model):
        model.parameterization = "v"  # A1111's v2-inference-v.yaml, found by the same probe
    model.is_sdxl, model.is_sd2 = family == "sdxl", family == "sd2"
    model.is_sd1 = family == "sd1"
    if family == "sdxl":
        _extend_sdxl(model)
    model.eval().requires_grad_(False)
    return _place(model, device or torch.device("cpu"), half)


def _instantiate(config: str, family: str) -> torch.nn.Module:
    from omegaconf import OmegaConf
    try:
        settings = OmegaConf.load(config)
    except Exception as error:
        raise CheckpointError(f"{config}: not a readable yaml config ({error})") from None
    _repair(settings.model.params, family)
    if family == "sdxl":  # as A1111 sets sgm up: torch's attention, no xformers
        import sgm.modules.attention
        sgm.modules.attention.SDP_IS_AVAILABLE, sgm.modules.attention.XFORMERS_IS_AVAILABLE = True, False
    from ldm.util import instantiate_from_config
    try:
        with text_models_from_config():
            return instantiate_from_config(settings.model)
    except Exception as error:
        raise CheckpointError(f"cannot build the model of {config}: {type(error).__name__}: {error}") from None


def _repair(params, family: str) -> None:
    """What A1111's ``sd_models.repair_config`` changes in a config (no EMA copy, no ldm
    activation checkpointing: the run's own setting decides; a plain-attention VAE without
    xformers), and OpenCLIP text encoders built without downloading their pretrained weights:
    the checkpoint holds them."""
    if "use_ema" not in params:
        params.use_ema = False
    for network in ("unet_config", "network_config"):
        if network in params:
            params[network].params.use_checkpoint = False
    ddconfig = params.get("first_stage_config", {}).get("params", {}).get("ddconfig", {})
    if ddconfig.get("attn_type") == "vanilla-xformers" and importlib.util.find_spec("xformers") is None:
        ddconfig.attn_type = "vanilla"
    encoders = list(params.conditioner_config.params.emb_models) if family == "sdxl" else [params.cond_stage_config]
    for encoder in encoders:
        if "OpenCLIP" in str(encoder.get("target", "")) and "version" in encoder.get("params", {}):
            encoder.params.version = None


@contextlib.contextmanager
def text_models_from_config() -> Iterator[None]:
    """Hugging Face CLIP text models built from their config alone while the model is built:
    the checkpoint holds their weights (A1111 skips loading them the same way), so only the
    config and tokenizer are read (``version``: a folder, or the Hugging Face cache A1111
    filled), and no weights file is downloaded or read."""
    from transformers import CLIPTextConfig, CLIPTextModel

    def from_config(cls, name, *args, **kwargs):
        return cls(CLIPTextConfig.from_pretrained(name))

    CLIPTextModel.from_pretrained = classmethod(from_config)
    try:
        yield
    finally:
        del CLIPTextModel.from_pretrained  # PreTrainedModel's again


def _predicts_v(model: torch.nn.Module) -> bool:
    """A1111's probe (``is_using_v_parameterization_for_sd2``): a v-model's output for a flat
    input at the last timestep lies far below the input."""
    unet = model.model.diffusion_model
    with torch.no_grad():
        context = torch.full((1, 2, unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features), 0.5)
        x = torch.full((1, 4, 8, 8), 0.5)
        out = (unet(x, torch.asarray([999]), context=context) - x).mean().item()
    return out < -1


def _extend_sdxl(model: torch.nn.Module) -> None:
    """What A1111's ``sd_models_xl.extend_sdxl`` adds to an sgm ``DiffusionEngine`` and this
    trainer reads: ``apply_model``, ``parameterization`` and ``alphas_cumprod`` (fp32)."""
    from sgm.modules.diffusionmodules.denoiser_scaling import VScaling
    from sgm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization

    model.apply_model = types.MethodType(_sgm_apply_model, model)
    model.parameterization = "v" if isinstance(model.denoiser.scaling, VScaling) else "eps"
    model.alphas_cumprod = torch.asarray(LegacyDDPMDiscretization().alphas_cumprod, dtype=torch.float32)


def _sgm_apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return self.model(x, t, cond)


def _place(model: torch.nn.Module, device: torch.device, half: bool) -> torch.nn.Module:
    """On ``device``, halved as A1111 halves it. The text encoders move their tokens to their
    own ``device`` attribute (ldm's and sgm's default to "cuda", i.e. GPU 0): set it too."""
    encoders = list(model.conditioner.embedders) if hasattr(model, "conditioner") else [model.cond_stage_model]
    for encoder in encoders:
        if isinstance(vars(encoder).get("device"), (str, torch.device)):
            encoder.device = device
    if device.type == "cuda" and half:
        vae = model.first_stage_model
        alphas_cumprod = model.alphas_cumprod
        model.first_stage_model = None
        model.half()
        model.first_stage_model = vae
        model.alphas_cumprod = alphas_cumprod
    return model.to(device)
