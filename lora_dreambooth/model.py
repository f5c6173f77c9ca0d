"""The only engine code that knows ldm/sgm internals: images → latents, prompts → conditioning,
noisy latents → prediction, and the model's own noise schedule.

:func:`make_backend` picks the backend for the model A1111 holds: :class:`LdmBackend` for an
ldm ``LatentDiffusion`` (SD 1.x / 2.x, plain or as A1111 wraps its ``cond_stage_model``),
:class:`SdxlBackend` for an sgm ``DiffusionEngine`` (SDXL base). Every call goes through the
model's own methods and modules (``encode_first_stage``, ``get_learned_conditioning`` or the
conditioner's embedders, ``apply_model``) so A1111's hijacks (emphasis, long prompts,
embeddings) stay in effect.
"""
from __future__ import annotations

import abc
import contextlib
import functools
from typing import TYPE_CHECKING, Iterator, Union

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from . import torch_compat

if TYPE_CHECKING:
    from .data import MicroBatch

#: ldm/sgm blocks whose forward is wrapped with activation checkpointing.
_CHECKPOINTED_BLOCKS = ("ResBlock", "BasicTransformerBlock")

#: What ``predict`` takes: a cross-attention tensor (SD1/SD2) or SDXL's
#: ``{"crossattn": [N, 77, 2048], "vector": [N, 2816]}``.
Conditioning = Union[torch.Tensor, dict[str, torch.Tensor]]

#: SDXL: the conditioner input key of the text embedders, and those of the size embedders in
#: sgm's order (SDXL base; the refiner's ``aesthetic_score`` is not supported).
SDXL_TEXT_KEY = "txt"
SDXL_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
#: The image size (height, width) A1111 conditions on when the prompts carry none.
SDXL_DEFAULT_SIZE = (1024, 1024)


class UnsupportedModelError(ValueError):
    """The loaded model is not one this engine trains (message says which and why)."""


class Backend(abc.ABC):
    """What the training loop needs from a model; :class:`LdmBackend` and :class:`SdxlBackend`
    fill in how images are encoded, latents scaled, prompts conditioned and the schedule read."""

    family: str  # "sd1", "sd2" or "sdxl"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.unet: torch.nn.Module = model.model.diffusion_model
        self.parameterization: str = getattr(model, "parameterization", "eps")
        if self.parameterization not in ("eps", "v"):
            raise UnsupportedModelError(
                f"'{self.parameterization}' parameterization is not supported (only eps and v)")
        if getattr(self.unet, "in_channels", 4) != 4:
            raise UnsupportedModelError(
                "inpainting / instruct models (UNet with more than 4 input channels) are not "
                "supported")

    @property
    def sd_version(self) -> str:
        """The export's version tag (see ``export.save_lora``)."""
        return self.family

    # --- where things live --------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def unet_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.model.first_stage_model.parameters()).dtype

    # --- images → latents ---------------------------------------------------------------

    @abc.abstractmethod
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean ‖ logvar) for pixels in [-1, 1]: cacheable,
        and sampled afresh every step by ``latents_from_moments``."""

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample z ~ N(mean, exp(logvar)) with our generator, then the model's scaling."""
        shape = torch.chunk(moments, 2, dim=1)[0].shape
        return self.latents_from_noise(moments, torch.randn(shape, generator=generator, device=generator.device))

    def latents_from_noise(self, moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = mean + std × ``noise`` (standard normal, drawn by the caller), then the scaling."""
        mean, logvar = torch.chunk(moments.float(), 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        z = mean + std * noise.to(mean.device)
        return self._scale_latents(z.to(self.device))

    @abc.abstractmethod
    def _scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Sampled VAE latents → the scale the UNet works at."""

    def latent_shape(self, pixels_shape: torch.Size) -> torch.Size:
        """The shape of the latents of pixels of ``pixels_shape`` ([N, 3, H, W]), without running
        the VAE: its encoder (ldm's and sgm's) halves H and W, rounding down, at every level but
        the last, and ``quant_conv`` gives mean ‖ logvar."""
        vae = self.model.first_stage_model
        factor = 2 ** (vae.encoder.num_resolutions - 1)
        n, _, height, width = pixels_shape
        return torch.Size((n, vae.quant_conv.out_channels // 2, height // factor, width // factor))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in [0, 1]."""
        x = self.model.decode_first_stage(latents.to(self.device, self.vae_dtype))
        return ((x.float() + 1) / 2).clamp(0, 1)

    # --- prompts → conditioning, and the denoiser --------------------------------------

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """What ``predict`` takes for these prompts; differentiable when a text encoder trains."""

    def encode_negative_prompts(self, prompts: list[str]) -> Conditioning:
        """The unconditional side of classifier-free guidance (previews)."""
        return self.encode_prompts(prompts)

    def conditioning(self, cond: Conditioning, batch: "MicroBatch") -> Conditioning:
        """``cond`` (from ``encode_prompts`` of ``batch.prompts``) completed with what depends
        on the batch's images rather than its prompts (SDXL: sizes and crops)."""
        return cond

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        return self.model.apply_model(noisy_latents.to(self.unet_dtype), timesteps, cond)

    # --- noise schedules from the model's own ------------------------------------------

    def _betas(self) -> torch.Tensor:
        """The model's β_t, t = 0 … T−1, from ``alphas_cumprod``: β_t = 1 − ᾱ_t / ᾱ_{t−1}.

        ``alphas_cumprod`` is what A1111 keeps in fp32 when it halves the model (ldm's
        ``betas`` buffer goes to fp16 with it), and sgm keeps no betas at all."""
        alphas_cumprod = self.model.alphas_cumprod.detach().double().cpu()
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return 1 - alphas_cumprod / previous

    def _schedule_args(self) -> dict:
        betas = self._betas().numpy()
        prediction = "v_prediction" if self.parameterization == "v" else "epsilon"
        return {"num_train_timesteps": len(betas), "trained_betas": betas,
                "prediction_type": prediction}

    def training_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(**self._schedule_args())

    def sampling_scheduler(self) -> DPMSolverMultistepScheduler:
        """DPM++ 2M, the lecture's preview sampler."""
        return DPMSolverMultistepScheduler(**self._schedule_args(), algorithm_type="dpmsolver++",
                                           solver_order=2)

    # --- memory ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def gradient_checkpointing(self, enabled: bool) -> Iterator[None]:
        """Recompute ResBlock / transformer activations in backward. Wraps each block's
        forward on the instance (not the class) and removes the wrapper afterwards, so the
        module objects and A1111's own hijacks are untouched. ldm and sgm name these blocks
        alike."""
        wrapped: list[torch.nn.Module] = []
        try:
            if enabled:
                for module in self.unet.modules():
                    if type(module).__name__ in _CHECKPOINTED_BLOCKS and "forward" not in vars(module):
                        module.forward = functools.partial(_checkpointed, type(module).forward, module)
                        wrapped.append(module)
            yield
        finally:
            for module in wrapped:
                del module.forward


class LdmBackend(Backend):
    """Wraps an ldm ``LatentDiffusion`` (SD 1.x / 2.x) for the training loop."""

    def __init__(self, model: torch.nn.Module):
        if getattr(model, "is_sdxl", False) or not hasattr(model, "get_learned_conditioning"):
            raise UnsupportedModelError(
                "this model is not an SD 1.x/2.x LatentDiffusion (SDXL models take SdxlBackend; "
                "other families are not supported)")
        super().__init__(model)
        self.family = "sd2" if _is_sd2(model) else "sd1"

    @property
    def sd_version(self) -> str:
        """The export tag: "sd1", "sd2" (512-base, eps) or "sd2-v" (768-v)."""
        if self.family == "sd2" and self.parameterization == "v":
            return "sd2-v"
        return self.family

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.model.encode_first_stage(pixels.to(self.device, self.vae_dtype))
        return _finite(getattr(posterior, "parameters", posterior).float())

    def _scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        # ldm's get_first_stage_encoding of a tensor multiplies by scale_factor.
        return self.model.get_first_stage_encoding(z)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Cross-attention conditioning; differentiable when the text encoder trains."""
        return self.model.get_learned_conditioning(list(prompts))


class SdxlBackend(Backend):
    """Wraps SDXL base as A1111 holds it: an sgm ``DiffusionEngine`` whose ``conditioner``
    runs two text embedders (HF CLIP ViT-L, OpenCLIP bigG; plain or wrapped by A1111) and three
    size embedders, and whose ``apply_model(x, t, {"crossattn", "vector"})`` runs the UNet.

    The conditioning is built the way ``GeneralConditioner`` builds it — each embedder on its
    input, 3-D outputs concatenated into ``crossattn``, 2-D ones into ``vector`` — but by
    calling the embedders here: the conditioner runs frozen embedders without gradients, which
    would stop text-encoder training. ``vector`` is te2's pooled output followed by the
    embeddings of original size, crop and target size, so the text part can be cached per
    prompt and the size part built per sample (:meth:`conditioning`).
    """

    family = "sdxl"

    def __init__(self, model: torch.nn.Module):
        conditioner = getattr(model, "conditioner", None)
        embedders = list(getattr(conditioner, "embedders", []))
        keys = [getattr(e, "input_key", None) for e in embedders]
        n_text = sum(key == SDXL_TEXT_KEY for key in keys)
        if not n_text or keys != [SDXL_TEXT_KEY] * n_text + list(SDXL_SIZE_KEYS):
            raise UnsupportedModelError(
                "only SDXL base is supported: its conditioner must run the text encoders and then "
                f"the {', '.join(SDXL_SIZE_KEYS)} embedders (found {keys})")
        super().__init__(model)
        self._text_embedders = embedders[:n_text]
        self._size_embedders = embedders[n_text:]

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """sgm's ``encode_first_stage`` returns a latent already sampled and scaled, so the
        moments come from the VAE's encoder and ``quant_conv`` (ldm's and sgm's alike)."""
        vae = self.model.first_stage_model
        moments = vae.quant_conv(vae.encoder(pixels.to(self.device, self.vae_dtype)))
        return _finite(moments.float())

    def _scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        # A1111's SDXL get_first_stage_encoding is the identity: scale here.
        return z * self.model.scale_factor

    def encode_prompts(self, prompts: list[str], negative: bool = False) -> dict[str, torch.Tensor]:
        """``{"crossattn", "vector"}`` as A1111's ``get_learned_conditioning`` builds it for a
        list of prompts: image size 1024 × 1024, crop (0, 0) (:meth:`conditioning` puts in the
        real ones). ``negative``: A1111's negative-prompt rule, an all-empty batch gets zero
        text embeddings (crossattn and pooled part); otherwise, as for training captions
        (sgm's default), "" is encoded like any prompt."""
        zero = negative and all(prompt == "" for prompt in prompts)
        crossattn, pooled = self._text(list(prompts), zero)
        n = len(prompts)
        sizes = self._sizes([SDXL_DEFAULT_SIZE] * n, [(0, 0)] * n, [SDXL_DEFAULT_SIZE] * n)
        return {"crossattn": crossattn, "vector": torch.cat([pooled, sizes.to(pooled.dtype)], dim=1)}

    def encode_negative_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode_prompts(prompts, negative=True)

    def conditioning(self, cond: dict[str, torch.Tensor], batch: "MicroBatch") -> dict[str, torch.Tensor]:
        """Replace the size part of ``vector`` (its last columns) with each sample's original
        size, crop and the batch's target size."""
        n = len(batch.prompts)
        sizes = self._sizes(batch.original_sizes, batch.crops, [batch.target_size] * n)
        vector = cond["vector"]
        text_part = vector[:, :vector.shape[1] - sizes.shape[1]]
        return {"crossattn": cond["crossattn"],
                "vector": torch.cat([text_part, sizes.to(vector.dtype)], dim=1)}

    def _text(self, prompts: list[str], zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(crossattn, pooled): every text embedder's outputs, 3-D ones joined along features
        (te1 ‖ te2), 2-D ones (te2's pooled) along columns."""
        crossattn: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        for embedder in self._text_embedders:
            out = embedder(prompts)
            for emb in out if isinstance(out, (list, tuple)) else [out]:
                if emb.dim() not in (2, 3):
                    raise UnsupportedModelError(f"unexpected {emb.dim()}-D text embedding")
                (crossattn if emb.dim() == 3 else pooled).append(torch.zeros_like(emb) if zero else emb)
        return torch.cat(crossattn, dim=2), torch.cat(pooled, dim=1)

    def _sizes(self, originals: list[tuple[int, int]], crops: list[tuple[int, int]],
               targets: list[tuple[int, int]]) -> torch.Tensor:
        """[N, 3 × 2 × d]: the size embedders' outputs for (height, width) / (top, left) pairs."""
        inputs = dict(zip(SDXL_SIZE_KEYS, (originals, crops, targets)))
        return torch.cat([embedder(torch.tensor(inputs[embedder.input_key], dtype=torch.float32,
                                                device=self.device))
                          for embedder in self._size_embedders], dim=1)


def make_backend(model: torch.nn.Module) -> Backend:
    """The backend for ``model``: SDXL (sgm, has a ``conditioner``) or SD 1.x/2.x (ldm)."""
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        return SdxlBackend(model)
    return LdmBackend(model)


def cat_conditioning(parts: list[Conditioning]) -> Conditioning:
    """Join per-prompt conditionings along the batch (tensors, or dicts of tensors)."""
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(parts)


def detach_conditioning(cond: Conditioning) -> Conditioning:
    if isinstance(cond, dict):
        return {key: value.detach() for key, value in cond.items()}
    return cond.detach()


def _finite(moments: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(moments).all():
        raise ValueError("the VAE gave NaN/inf latents (an fp16 VAE overflowing?): start A1111 with "
                         "--no-half-vae or load an fp16-safe VAE")
    return moments


def _checkpointed(forward, module, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(module, *args, **kwargs)
    return torch_compat.checkpoint(forward, module, *args, **kwargs)


def _is_sd2(model: torch.nn.Module) -> bool:
    if getattr(model, "is_sd2", False):
        return True
    embedder = getattr(model.cond_stage_model, "wrapped", model.cond_stage_model)
    return type(embedder).__name__ == "FrozenOpenCLIPEmbedder"
