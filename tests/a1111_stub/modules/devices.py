"""Stand-in for modules/devices.py on a CPU-only machine."""
import contextlib
import gc

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32


def torch_gc() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def autocast(disable: bool = False):
    return contextlib.nullcontext()
