"""txt2img through A1111's own processing: the user's sampler code, VAE and prompt handling
(emphasis, embeddings) make the previews, class images and contamination grids."""
from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Optional

from PIL import Image
from modules import paths_internal, processing, shared

from ..export import atomic_write
from ..grid import EXTRA_NETWORK, lora_tag

SAMPLER = "DPM++ 2M"


def strip_extra_networks(prompt: str) -> str:
    """The prompt without extra networks: one in a preview would load a network on top of the
    one being trained."""
    text = re.sub(r",(\s*,)+", ",", EXTRA_NETWORK.sub("", prompt))
    return text.strip(" ,\n")


def txt2img(prompt: str, negative_prompt: str, *, seed: int, steps: int, cfg_scale: float,
            width: int, height: int) -> Optional[Image.Image]:
    """One image without any extra network (previews, class images, the model's prior), or
    None when A1111's Interrupt/Stop cut the call short."""
    return _process(strip_extra_networks(prompt), negative_prompt, seed=seed, steps=steps,
                    cfg_scale=cfg_scale, width=width, height=height)


def txt2img_with_lora(prompt: str, negative_prompt: str, lora: str, weight: float, *, seed: int,
                      steps: int, cfg_scale: float, width: int, height: int) -> Optional[Image.Image]:
    """One image with the LoRA ``lora`` applied by A1111's own Lora extension (``<lora:name:w>``
    appended to the prompt, any other extra network removed). A1111 leaves the LoRA merged into
    the weights after the call: the caller restores them (``a1111.deactivate_networks``)."""
    tagged = f"{strip_extra_networks(prompt)} {lora_tag(lora, weight)}".strip()
    return _process(tagged, negative_prompt, seed=seed, steps=steps, cfg_scale=cfg_scale,
                    width=width, height=height)


def _process(prompt: str, negative_prompt: str, *, seed: int, steps: int, cfg_scale: float,
             width: int, height: int) -> Optional[Image.Image]:
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt,
        negative_prompt=strip_extra_networks(negative_prompt), seed=seed, steps=steps,
        cfg_scale=cfg_scale, width=width, height=height, sampler_name=SAMPLER, batch_size=1,
        n_iter=1, do_not_save_samples=True, do_not_save_grid=True)
    # Conditionings of our own: A1111 shares a class-level cache that ignores text-encoder
    # weights, so a preview would reuse a stale one while the text encoder (or a pivotal
    # embedding) trains, and one computed with our adapters could later serve the user.
    p.cached_c, p.cached_uc = [None, None], [None, None]
    with _users_params_txt_kept():
        images = processing.process_images(p).images
    return images[0] if images else None


@contextlib.contextmanager
def _users_params_txt_kept() -> Iterator[None]:
    """A1111 writes every generation's parameters to ``<data>/params.txt`` (the "read
    generation parameters" button reads it back). Our previews are not the user's
    generations: put their file back as it was, or remove the one we caused."""
    path = os.path.join(paths_internal.data_path, "params.txt")
    try:
        with open(path, "rb") as f:
            kept: Optional[bytes] = f.read()
    except FileNotFoundError:
        kept = None
    try:
        yield
    finally:
        if kept is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            atomic_write(path, lambda tmp: open(tmp, "wb").write(kept))
