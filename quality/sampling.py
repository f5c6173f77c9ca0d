"""Sampling the way previews are sampled (DPM++ 2M, 20 steps, CFG 5), many pictures at once.

Each picture starts from its own seed's noise, as ``lora_dreambooth.preview.sample`` draws
it, so a picture does not depend on what else is in its batch. The schedule, the denoiser
and the decoder are the engine's ``Backend`` (``make_backend``), with whatever adapters the
model holds at the time.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lora_dreambooth.model import Backend, cat_conditioning

STEPS = 20
CFG = 5.0


@torch.no_grad()
def sample(backend: Backend, prompts: Sequence[str], seeds: Sequence[int], negative: str = "",
           steps: int = STEPS, cfg_scale: float = CFG, size: int = 64, chunk: int = 64) -> torch.Tensor:
    """Pictures for ``prompts[i]`` from ``seeds[i]``, uint8 [N, 3, size, size]."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out = [torch.zeros((0, 3, size, size), dtype=torch.uint8)]
    for start in range(0, len(prompts), chunk):
        part = list(prompts[start:start + chunk])
        noise = torch.cat([torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(s))
                           for s in seeds[start:start + chunk]])
        out.append(_denoise(backend, part, noise, negative, steps, cfg_scale))
    return torch.cat(out)


def _denoise(backend: Backend, prompts: list[str], noise: torch.Tensor, negative: str, steps: int,
             cfg_scale: float) -> torch.Tensor:
    n = len(prompts)
    scheduler = backend.sampling_scheduler()
    scheduler.set_timesteps(steps)
    both = cat_conditioning([backend.encode_negative_prompts([negative] * n), backend.encode_prompts(prompts)])
    latents = (noise * scheduler.init_noise_sigma).to(backend.device)
    for t in scheduler.timesteps:
        timesteps = torch.full((2 * n,), int(t), device=backend.device, dtype=torch.long)
        uncond, cond = backend.predict(torch.cat([latents] * 2), timesteps, both).float().chunk(2)
        latents = scheduler.step(uncond + cfg_scale * (cond - uncond), t, latents).prev_sample
    return (backend.decode(latents).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
