"""The only engine code that knows ldm internals: images → latents, prompts → conditioning,
noisy latents → prediction, and the model's own noise schedule.

Works on a plain ldm ``LatentDiffusion`` and on the one A1111 holds (whose
``cond_stage_model`` wraps the embedder); every call goes through the model's own methods
(``encode_first_stage``, ``get_first_stage_encoding``, ``get_learned_conditioning``,
``apply_model``) so A1111's hijacks (emphasis, long prompts, embeddings) stay in effect.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

#: ldm blocks whose forward is wrapped with activation checkpointing.
_CHECKPOINTED_BLOCKS = ("ResBlock", "BasicTransformerBlock")


class UnsupportedModelError(ValueError):
    """The loaded model is not one this engine trains (message says which and why)."""


class LdmBackend:
    """Wraps an ldm ``LatentDiffusion`` (SD 1.x / 2.x) for the training loop."""

    def __init__(self, model: torch.nn.Module):
        if getattr(model, "is_sdxl", False) or not hasattr(model, "get_learned_conditioning"):
            raise UnsupportedModelError(
                "this model is not an SD 1.x/2.x LatentDiffusion (SDXL and other families are "
                "not supported yet)")
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
        self.family = "sd2" if _is_sd2(model) else "sd1"

    @property
    def sd_version(self) -> str:
        """The export's version tag: "sd1", "sd2" (512-base, eps) or "sd2-v" (768-v)."""
        if self.family == "sd2" and self.parameterization == "v":
            return "sd2-v"
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

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean ‖ logvar) for pixels in [-1, 1]: cacheable,
        and sampled afresh every step by ``latents_from_moments``."""
        posterior = self.model.encode_first_stage(pixels.to(self.device, self.vae_dtype))
        moments = getattr(posterior, "parameters", posterior)
        return moments.float()

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample z ~ N(mean, exp(logvar)) with our generator, then the model's own scaling
        (``get_first_stage_encoding`` of a tensor multiplies by ``scale_factor``)."""
        mean, logvar = torch.chunk(moments.float(), 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device)
        z = mean + std * noise.to(mean.device)
        return self.model.get_first_stage_encoding(z.to(self.device))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in [0, 1]."""
        x = self.model.decode_first_stage(latents.to(self.device, self.vae_dtype))
        return ((x.float() + 1) / 2).clamp(0, 1)

    # --- prompts → conditioning, and the denoiser --------------------------------------

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Cross-attention conditioning; differentiable when the text encoder trains."""
        return self.model.get_learned_conditioning(list(prompts))

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        return self.model.apply_model(noisy_latents.to(self.unet_dtype), timesteps, cond)

    # --- noise schedules from the model's own betas ------------------------------------

    def _schedule_args(self) -> dict:
        betas = self.model.betas.detach().double().cpu().numpy()
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
        module objects and A1111's own hijacks are untouched."""
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


def _checkpointed(forward, module, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(module, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, module, *args, use_reentrant=False, **kwargs)


def _is_sd2(model: torch.nn.Module) -> bool:
    if getattr(model, "is_sd2", False):
        return True
    embedder = getattr(model.cond_stage_model, "wrapped", model.cond_stage_model)
    return type(embedder).__name__ == "FrozenOpenCLIPEmbedder"
