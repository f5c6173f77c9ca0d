"""txt2img through A1111's own processing: the user's sampler code, VAE and prompt handling
(emphasis, embeddings) make the previews and class images."""
from __future__ import annotations

import re
from typing import Optional

from PIL import Image
from modules import processing, shared

#: A1111's extra-network syntax (``<lora:name:1>``, ``<hypernet:…>``): any of these in a
#: preview would load a network on top of the one being trained.
_EXTRA_NETWORK = re.compile(r"\s*<\w+:[^>]+>")

SAMPLER = "DPM++ 2M"


def strip_extra_networks(prompt: str) -> str:
    text = re.sub(r",(\s*,)+", ",", _EXTRA_NETWORK.sub("", prompt))
    return text.strip(" ,\n")


def txt2img(prompt: str, negative_prompt: str, *, seed: int, steps: int, cfg_scale: float,
            width: int, height: int) -> Optional[Image.Image]:
    """One image, or None when A1111's Interrupt/Stop cut the call short."""
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=strip_extra_networks(prompt),
        negative_prompt=strip_extra_networks(negative_prompt), seed=seed, steps=steps,
        cfg_scale=cfg_scale, width=width, height=height, sampler_name=SAMPLER, batch_size=1,
        n_iter=1, do_not_save_samples=True, do_not_save_grid=True)
    images = processing.process_images(p).images
    return images[0] if images else None
