"""The registry of network types: everything that differs between LoRA, LoCon, LoHa, LoKr and
DoRA lives in one module per type (see :class:`base.NetworkType`); config validation, the tab,
the API, the demo, the adapters, the export and the resume ask here.

Adding a type: a module that defines its ``NetworkType``, and one line in ``_TYPES``.
"""
from __future__ import annotations

import json
from typing import Optional

from .base import ADAPTER, NetworkType
from .dora import DORA
from .locon import LOCON
from .loha import LOHA
from .lokr import LOKR
from .lora import LORA

_TYPES = (
    LORA,
    LOCON,
    LOHA,
    LOKR,
    DORA,
)

REGISTRY: dict[str, NetworkType] = {t.name: t for t in _TYPES}
#: The network type names, in the order the tab lists them.
NAMES: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> NetworkType:
    """The type called ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown network type {name!r}; expected one of {', '.join(NAMES)}") from None


def file_args(metadata: dict[str, str]) -> dict[str, str]:
    """A file's ``ss_network_args`` as a dict (empty when absent or not JSON)."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in args.items()} if isinstance(args, dict) else {}


def from_metadata(metadata: dict[str, str]) -> Optional[NetworkType]:
    """The type a file records (its ``ss_network_module`` and ``ss_network_args``), the most
    specific one when several fit (DoRA is LoCon with ``dora_wd``); None when none does."""
    module, args = metadata.get("ss_network_module", ""), file_args(metadata)
    fits = [t for t in _TYPES if t.module == module and t.args.items() <= args.items()]
    return max(fits, key=lambda t: len(t.args), default=None)


def conv_labels() -> str:
    """"LoCon/LoHa/LoKr/DoRA": the types with convolution options, for labels."""
    return "/".join(t.label for t in _TYPES if t.convs)


__all__ = ["ADAPTER", "NetworkType", "REGISTRY", "NAMES", "get", "file_args", "from_metadata", "conv_labels"]
