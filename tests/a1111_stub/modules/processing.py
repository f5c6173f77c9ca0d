"""Stand-in for modules/processing.py: a txt2img request object and ``process_images``.

What it keeps of A1111 1.10.1: the dataclass fields the host passes (unknown keyword →
TypeError), ``job_count == -1`` → ``n_iter``, Interrupt checked before each batch (an
interrupted call returns no images), ``params.txt`` in the data folder overwritten by the
first batch, the class-level conditioning cache (reused while prompt, steps, checkpoint,
networks and size match), ``sampling_step(s)`` and ``state.nextjob()`` per batch, seed -1 →
random, and ``<name:args>`` extra-network tags parsed out of the prompt and handed to the
registered extra networks before sampling (``<lora:name:w>`` really merges the LoRA, see
networks.py; every LoRA named is also recorded in ``activated_networks``).
Sampling itself is the engine's DPM++ 2M renderer on the given model, so a preview really
shows the adapter being trained."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from modules import extra_networks, paths_internal, shared

activated_networks: list[str] = []


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    override_settings: dict = field(default_factory=dict)
    disable_extra_networks: bool = False

    # A1111 keeps the last conditionings at class level ("persistent cond cache", on by
    # default) and every new request shares those two lists unless given its own.
    cached_uc = [None, None]
    cached_c = [None, None]

    def __post_init__(self):
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data):
        """A1111's rule: reuse a cache entry whose parameters match (prompts, steps, checkpoint,
        extra networks, size — not the text encoder's weights), else compute and store."""
        cached_params = (tuple(required_prompts), steps, shared.sd_model.sd_checkpoint_info,
                         repr(extra_network_data), self.width, self.height)
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                return cache[1]
        cache = caches[0]
        cache[1] = function(required_prompts)
        cache[0] = cached_params
        return cache[1]


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75


class Processed:
    def __init__(self, p: StableDiffusionProcessing, images_list: list, seed: int = -1, info: str = ""):
        self.images = images_list
        self.prompt = p.prompt
        self.seed = seed
        self.info = info


def process_images(p: StableDiffusionProcessing) -> Processed:
    from lora_dreambooth.model import make_backend
    from lora_dreambooth.preview import sample

    state = shared.state
    seed = random.randrange(2 ** 32) if p.seed in (None, -1) else int(p.seed)
    prompt, extra_network_data = extra_networks.parse_prompt(p.prompt)
    images = []
    if state.job_count == -1:
        state.job_count = p.n_iter
    for n in range(p.n_iter):
        if state.interrupted:
            break
        if not p.disable_extra_networks:
            activated_networks.extend(params.items[0] for params in extra_network_data.get("lora", []))
            extra_networks.activate(p, extra_network_data)
        if n == 0:  # A1111 records the last generation's infotext for the "read params" button
            with open(os.path.join(paths_internal.data_path, "params.txt"), "w", encoding="utf8") as file:
                file.write(f"{prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Seed: {seed}")
        state.sampling_steps = p.steps
        backend = make_backend(shared.sd_model)
        uc = p.get_conds_with_caching(backend.encode_negative_prompts, [p.negative_prompt], p.steps,
                                      [p.cached_uc], extra_network_data)
        c = p.get_conds_with_caching(backend.encode_prompts, [prompt], p.steps, [p.cached_c],
                                     extra_network_data)
        for i in range(p.batch_size):
            images.append(sample(backend, c, uc, seed=seed + n * p.batch_size + i, steps=p.steps,
                                 cfg_scale=p.cfg_scale, width=p.width, height=p.height))
        state.sampling_step = p.steps
        state.nextjob()
    if not p.disable_extra_networks and extra_network_data:
        extra_networks.deactivate(p, extra_network_data)
    return Processed(p, images, seed=seed)
