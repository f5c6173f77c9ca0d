"""Preview images with the adapter being trained: DPM++ 2M (diffusers' multistep solver) and
classifier-free guidance, as the lecture previews (20 steps, CFG 5). Inside A1111 the host
renders with A1111's own sampler instead; this renderer serves the demo and tests."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .model import Backend, Conditioning, cat_conditioning


@torch.no_grad()
def render_preview(backend: Backend, prompt: str, negative_prompt: str, *, seed: int,
                   steps: int, cfg_scale: float, width: int, height: int) -> Image.Image:
    cond = backend.encode_prompts([prompt])
    uncond = backend.encode_negative_prompts([negative_prompt])
    return sample(backend, cond, uncond, seed=seed, steps=steps, cfg_scale=cfg_scale, width=width,
                  height=height)


@torch.no_grad()
def sample(backend: Backend, cond: Conditioning, uncond: Conditioning, *, seed: int, steps: int,
           cfg_scale: float, width: int, height: int) -> Image.Image:
    """One image from given conditionings (one prompt each)."""
    scheduler = backend.sampling_scheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, height // 8, width // 8), generator=generator)
    latents = (latents * scheduler.init_noise_sigma).to(backend.device)
    both = cat_conditioning([uncond, cond])
    for t in scheduler.timesteps:
        timesteps = torch.full((2,), int(t), device=backend.device, dtype=torch.long)
        uncond_out, cond_out = backend.predict(torch.cat([latents] * 2), timesteps, both).float().chunk(2)
        guided = uncond_out + cfg_scale * (cond_out - uncond_out)
        latents = scheduler.step(guided, t, latents).prev_sample
    pixels = backend.decode(latents)[0].permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((pixels * 255).round().astype(np.uint8))
