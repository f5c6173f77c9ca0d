"""Whether the machine has room for A1111 to use the LoRA just trained.

The first time any LoRA is in a prompt, A1111's Lora extension (``network_apply_weights``) copies
the weight and bias of every layer it has named — nearly all of the UNet and the text encoders,
whether the LoRA touches a layer or not — to CPU memory before merging, and keeps the copies:
about 1.8 GiB for SD1.5 in fp16 (3.5 GiB in fp32), 6.1 GiB for SDXL in fp16 (12.2 GiB in fp32).
That cost is A1111's, with a LoRA trained here or anywhere; a run leaves nothing behind
(tests/test_host_memory.py). When it would not fit, the run's log says so before txt2img is
tried."""
from __future__ import annotations

from typing import Optional

import torch

GIB = 2 ** 30
MARGIN = GIB // 2  # what a generation itself needs on top, roughly, on the CPU side


def backup_bytes(model: torch.nn.Module) -> int:
    """Bytes A1111's Lora extension will copy to CPU memory the first time a LoRA is applied:
    the parameters of every layer it named that has no backup yet."""
    total = 0
    for module in model.modules():
        if getattr(module, "network_layer_name", None) is None or \
                getattr(module, "network_weights_backup", None) is not None:
            continue
        total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def available_bytes() -> Optional[int]:
    try:
        import psutil  # an A1111 requirement
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def warning(model: torch.nn.Module) -> str:
    """A line for the log when applying a LoRA would leave the machine short of memory, else ""."""
    needed, available = backup_bytes(model), available_bytes()
    if available is None or needed + MARGIN <= available:
        return ""
    return (f"memory is tight: the first txt2img with a LoRA makes A1111 copy {needed / GIB:.1f} GiB of "
            f"model weights to RAM (its Lora extension's backups) and {available / GIB:.1f} GiB is free. "
            "Close other programs, or restart A1111 before using the LoRA if it gets killed.")
