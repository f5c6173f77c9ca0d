"""What the host must know about the model A1111 holds: can it be trained here, and putting it
back to its base weights before training (A1111's Lora extension merges LoRAs in place)."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch
from modules import devices, lowvram, shared

from .. import memory
from ..families import family_defaults, family_label
from ..model import UnsupportedModelError, make_backend

#: Weight dtypes the engine trains on (A1111's fp8 weight storage is not one of them).
TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

NO_MODEL = "No Stable Diffusion model is loaded: pick a checkpoint at the top of the page first."
LOW_VRAM = ("Training is not possible with --lowvram or --medvram: they move parts of the model "
            "between devices during every step. Restart A1111 without them to train.")
SD3_NOT_SUPPORTED = ("SD3 models are not supported: load an SD 1.x, SD 2.x or SDXL checkpoint to "
                     "train.")


def model_problems(model) -> list[str]:
    """Why the loaded ``model`` cannot be trained now (empty list: it can)."""
    if model is None:
        return [NO_MODEL]
    problems = []
    is_sdxl = getattr(model, "is_sdxl", False)
    if getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False) \
            or (is_sdxl and getattr(shared.cmd_opts, "medvram_sdxl", False)) or lowvram.is_enabled(model):
        problems.append(LOW_VRAM)
    if getattr(model, "is_sd3", False):
        problems.append(SD3_NOT_SUPPORTED)
    else:
        try:
            make_backend(model)
        except (UnsupportedModelError, AttributeError) as error:
            problems.append(f"This checkpoint cannot be trained here ({type(model).__name__}): {error}. "
                            "Load an SD 1.x, SD 2.x or SDXL base checkpoint.")
    odd = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()
                  if p.dtype not in TRAINABLE_DTYPES})
    if odd:
        problems.append(f"The model's weights are stored as {', '.join(odd)} (Settings › "
                        "Optimizations › FP8 weight?): training needs fp16, bf16 or fp32 weights. "
                        "Turn that off and reload the checkpoint.")
    return problems


def lora_extension() -> Optional[ModuleType]:
    """The built-in Lora extension's ``networks`` module, or None when it is disabled or absent
    (inside A1111 its folder is on ``sys.path`` once it has loaded)."""
    try:
        return importlib.import_module("networks")
    except ImportError:
        return None


def deactivate_networks(model: torch.nn.Module) -> int:
    """Undo whatever LoRAs the last generation merged into ``model``, through the Lora
    extension's own restore path, and forget them so none is re-applied while we train or
    render previews. Returns how many layers were restored."""
    networks = lora_extension()
    if networks is None:
        return 0
    networks.loaded_networks.clear()
    restored = 0
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "network_current_names"):
                continue
            if module.network_current_names:
                restored += 1
            networks.network_restore_weights_from_backup(module)
            module.network_current_names = ()
    return restored


def refresh_lora_list() -> bool:
    """Rescan ``--lora-dir`` so ``<lora:name:w>`` resolves without a restart."""
    networks = lora_extension()
    if networks is None:
        return False
    networks.list_available_networks()
    return True


def release_memory() -> None:
    """What a run leaves back to the process (``memory.release``), then A1111's own cleanup
    (``torch_gc`` empties the CUDA cache)."""
    memory.release()
    devices.torch_gc()


def loaded_family() -> tuple[Optional[str], dict]:
    """(label such as "SDXL", that family's config defaults) for the model A1111 holds now;
    (None, {}) when none is loaded or it is not one we train."""
    model = shared.sd_model
    if model is None:
        return None, {}
    try:
        backend = make_backend(model)
    except (UnsupportedModelError, AttributeError):
        return None, {}
    return family_label(backend), family_defaults(backend)
