"""The torch APIs whose shape differs between A1111 1.10.1's torch (2.1.2) and current torch.

The engine runs inside whatever torch A1111 brings: 2.1.2 (what 1.10.1 installs) or a current
one (RTX 50-series cards need 2.7+). Everything that is spelled differently across that range
is asked for here, so one place knows the differences:

- ``torch.amp.GradScaler("cuda")`` exists from torch 2.3; before, the CUDA scaler is
  ``torch.cuda.amp.GradScaler`` (deprecated since, with a FutureWarning).
- Autocast on the CPU supports only bf16 on torch 2.1.2 (entering it with fp16 raises);
  current torch also takes fp16. Whether a device/dtype pair works is probed, not looked up
  by version.
- ``torch.utils.checkpoint`` wants ``use_reentrant`` stated (2.1.2 defaults to the reentrant
  variant with a warning; it computes no gradients for parameters inside a block none of
  whose inputs requires grad: adapters in a frozen model); the non-reentrant one also passes
  keyword arguments.

APIs that are the same over the range are called directly: ``torch.autocast``,
``torch.func.functional_call``, ``named_parameters(remove_duplicate=False)``,
``torch.cuda.OutOfMemoryError``, ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.utils.checkpoint

#: The CUDA gradient scaler's class on this torch (for type hints and ``isinstance``).
GradScaler = torch.amp.GradScaler if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler


def cuda_grad_scaler() -> GradScaler:
    """The loss scaler of an fp16 run on CUDA (default scale 2**16, grown every 2000 clean
    steps, halved on inf/NaN gradients). Without CUDA torch disables it (with a warning):
    ``scale`` then returns the loss unchanged and ``step`` is a plain ``optimizer.step()``."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def scaler_state(scaler: Optional[GradScaler]) -> Optional[dict[str, Any]]:
    """The scaler's state for an optimizer-state file: None when the run had no scaler or a
    disabled one (its ``state_dict`` is empty on every torch)."""
    if scaler is None:
        return None
    return scaler.state_dict() or None


def load_scaler_state(scaler: Optional[GradScaler], state: Optional[dict[str, Any]]) -> None:
    """Continue a scaler from :func:`scaler_state`. A run without a saved scale (an fp32/bf16
    or CPU run resumed in fp16 on CUDA) keeps the fresh scaler's default; a saved scale
    resumed without a scaler (fp16 resumed in fp32) is not needed."""
    if scaler is not None and state:
        scaler.load_state_dict(state)


@functools.lru_cache(maxsize=None)
def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch can autocast to ``dtype`` on ``device_type`` ("cuda" is assumed to,
    as on every torch in the range; torch 2.1.2's CPU autocast takes only bf16)."""
    if device_type != "cpu":
        return True
    try:
        with torch.autocast("cpu", dtype=dtype):
            return torch.mm(torch.ones(1, 1), torch.ones(1, 1)).dtype == dtype
    except RuntimeError:
        return False


def autocast(device_type: str, dtype: Optional[torch.dtype]) -> ContextManager:
    """Mixed precision to ``dtype`` for the forward pass, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def checkpoint(function: Callable, *args, **kwargs):
    """``function(*args, **kwargs)`` with its activations recomputed in backward instead of
    kept (non-reentrant: gradients reach parameters inside even when no input requires grad)."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


__all__ = ["GradScaler", "cuda_grad_scaler", "scaler_state", "load_scaler_state", "autocast_supported",
           "autocast", "checkpoint"]
