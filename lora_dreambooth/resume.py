"""Continuing a LoRA this extension wrote: its tensors back into fresh adapters of the same
kind, and the optimizer state of the run that wrote it.

The LoRA file alone gives the weights as saved (in the save precision) and the step count
(``ss_steps``). For a resume that continues *exactly*, a run also writes
``optimizer.safetensors`` into its run folder whenever it saves a LoRA: the fp32 adapter
weights, the optimizer's per-parameter state, and the step, tied to that LoRA by its
``sshs_model_hash`` (the hash covers only the tensor bytes, so it survives
``export.promote``'s renaming). Each save overwrites it: only the last saved file of a run
has its state. Only safetensors are ever read; nothing is unpickled.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Optional

import safetensors
import safetensors.torch
import torch

from . import export, networks, torch_compat
from .adapters import Adapters
from .config import TrainConfig
from .embedding import Pivot, load_vectors

#: The training state's file name in a run folder.
OPTIMIZER_FILE = "optimizer.safetensors"
_FORMAT = "lora-dreambooth optimizer state 1"
_BUNDLE = "bundle_emb."


class ResumeError(ValueError):
    """The file cannot be resumed with these settings (message says what to change)."""


@dataclass
class ResumeSource:
    """A LoRA file read for resuming."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]
    steps: int   # ss_steps: the optimizer steps it was trained for
    hash: str    # its addnet hash (what sshs_model_hash holds)


def read_lora(path: str) -> ResumeSource:
    name = os.path.basename(path)
    if not path.lower().endswith(".safetensors"):
        raise ResumeError(f"cannot resume from '{name}': only .safetensors files are read")
    if not os.path.isfile(path):
        raise ResumeError(f"cannot resume from '{path}': no such file")
    try:
        metadata, tensors = _read(path)
    except Exception as error:  # safetensors raises its own types for a damaged file
        raise ResumeError(f"cannot resume from '{name}': not a readable safetensors file ({error})") from None
    try:
        steps = int(metadata["ss_steps"])
    except (KeyError, ValueError):
        raise ResumeError(f"cannot resume from '{name}': it records no step count (ss_steps); "
                          "only LoRAs trained by this extension can be resumed") from None
    return ResumeSource(path, metadata, tensors, steps, export.addnet_hash(path))


def _read(path: str, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safetensors.safe_open(path, "pt") as f:
        return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()} if tensors else {}


# --- the LoRA's tensors ---------------------------------------------------------------------

def load_lora(source: ResumeSource, adapters: Adapters, pivot: Optional[Pivot], config: TrainConfig,
              sd_version: str) -> None:
    """Copy the file's tensors into freshly injected ``adapters`` (and ``pivot``'s vectors),
    after checking that they are the same network, ranks, alphas and layers; raises
    :class:`ResumeError` listing what to change otherwise."""
    problems = _settings_problems(source.metadata, config, sd_version)
    if not problems:
        problems = _tensor_problems(source.tensors, adapters, pivot)
    if problems:
        raise ResumeError(f"cannot resume from '{os.path.basename(source.path)}': " + "; ".join(problems))
    with torch.no_grad():
        for layer in adapters.layers:
            for suffix, param in export.layer_tensors(layer, adapters.network).items():
                param.copy_(source.tensors[f"{layer.target.kohya_name}.{suffix}"].to(param.dtype))
    if pivot is not None:
        load_vectors(pivot, source.tensors)


def _settings_problems(metadata: dict[str, str], config: TrainConfig, sd_version: str) -> list[str]:
    """What the metadata says differs from the settings (skipped where it says nothing)."""
    problems: list[str] = []
    base = metadata.get("ss_base_model_version")
    if base and base != export.version_info(sd_version)[0]:
        problems.append(f"it was trained on {base}, the loaded model is {export.version_info(sd_version)[3]}")
    recorded = networks.from_metadata(metadata)
    if recorded and recorded.name != config.network:
        problems.append(f"it is a {recorded.label} network: set network type to {recorded.name}")
    network = networks.get(config.network)
    note = "" if network.applies_alpha else f" ({network.label} files record alpha = rank)"
    expected = {"ss_network_dim": (config.rank, "rank", ""),
                "ss_network_alpha": (network.file_alpha(config.rank, config.alpha), "alpha", note)}
    args = networks.file_args(metadata) if network.convs else {}
    if network.convs:
        expected.update({"conv_dim": (config.conv_rank, "convolution rank", ""),
                         "conv_alpha": (network.file_alpha(config.conv_rank, config.conv_alpha),
                                        "convolution alpha", note)})
    for key, (value, label, hint) in expected.items():
        have = metadata.get(key, args.get(key))
        if have is not None and float(have) != float(value):
            problems.append(f"its {label} is {float(have):g}: set {label} to {float(have):g}{hint}")
    return problems


def _tensor_problems(tensors: dict[str, torch.Tensor], adapters: Adapters, pivot: Optional[Pivot]) -> list[str]:
    """Layers, shapes and alphas of the file against the injected adapters and pivot."""
    expected = export.kohya_tensors(adapters, torch.float32)
    if pivot is not None:
        expected.update(pivot.tensors())
    problems: list[str] = []
    missing = [k for k in expected if k not in tensors]
    if missing:
        problems.append(f"it has no tensors for {_count(missing)} of what these settings train "
                        f"(e.g. {min(missing)}){_hint(missing, missing=True)}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        problems.append(f"it has {_count(extra)} layers or embeddings these settings would not train "
                        f"(e.g. {min(extra)}){_hint(extra, missing=False)}")
    for key in expected.keys() & tensors.keys():
        want, have = expected[key], tensors[key]
        if want.shape != have.shape:
            problems.append(f"{key} is {tuple(have.shape)} in the file, {tuple(want.shape)} here"
                            + (" (the trigger has another token count)" if key.startswith(_BUNDLE) else
                               " (another rank)"))
        elif key.endswith(".alpha") and float(have) != float(want):
            problems.append(f"{key} is {float(have):g} in the file, {float(want):g} with these settings")
    return problems


def _count(keys: list[str]) -> int:
    """Layers (``<kohya name>.<suffix>``) and embeddings (``bundle_emb.<name>.<key>``) among
    tensor keys."""
    return len({".".join(key.split(".")[:2 if key.startswith(_BUNDLE) else 1]) for key in keys})


def _hint(keys: list[str], missing: bool) -> str:
    if all(k.startswith(_BUNDLE) for k in keys):
        return (": turn pivotal tuning on (with the same trigger)" if not missing else
                ": the file has no bundled embedding for this trigger; turn pivotal tuning off "
                "or resume from a pivotal run with the same trigger")
    if all(k.startswith("lora_te") for k in keys):
        return f": turn 'train text encoder' {'off' if missing else 'on'}"
    return ""


# --- the optimizer state ----------------------------------------------------------------------

def trainable_names(adapters: Adapters, pivot: Optional[Pivot]) -> dict[int, str]:
    """``id(parameter)`` → its name in the LoRA file (``<kohya name>.<suffix>``,
    ``bundle_emb.<trigger>.<key>``), for every trainable parameter."""
    names = {id(param): f"{layer.target.kohya_name}.{suffix}" for layer in adapters.layers
             for suffix, param in export.layer_tensors(layer, adapters.network).items()}
    if pivot is not None:
        names.update({id(param): name for name, param in pivot.named_parameters().items()})
    return names


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def save_state(path: str, optimizer: torch.optim.Optimizer, names: dict[int, str], step: int,
               lora_hash: str, scaler: Optional[torch_compat.GradScaler] = None) -> None:
    """Write the training state (atomically): ``param/<name>`` fp32 weights,
    ``state/<key>/<name>`` optimizer tensors; metadata: the step, the LoRA's hash, the
    optimizer class, non-tensor state values and the grad scaler's state, as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict] = {}
    for param in _optimizer_params(optimizer):
        name = names[id(param)]
        tensors[f"param/{name}"] = param.detach().to("cpu", torch.float32).contiguous()
        values[name] = {}
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                tensors[f"state/{key}/{name}"] = value.detach().cpu().contiguous()
                values[name][key] = None
            else:
                values[name][key] = value
    metadata = {"format": _FORMAT, "step": str(step), "lora_hash": lora_hash,
                "optimizer": type(optimizer).__name__, "state": json.dumps(values),
                "scaler": json.dumps(torch_compat.scaler_state(scaler))}
    export.atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata))


def load_state(path: str, optimizer: torch.optim.Optimizer, names: dict[int, str], lora_hash: str,
               scaler: Optional[torch_compat.GradScaler] = None) -> int:
    """Put a saved training state into ``optimizer`` (whose parameters hold the LoRA just
    loaded) and the exact fp32 weights into its parameters; returns the step. Raises
    :class:`ResumeError` when the state is not the one of that LoRA or of these parameters.
    The optimizer keeps its own hyperparameters (learning rates may change on resume)."""
    label = os.path.basename(path)
    if not os.path.isfile(path):
        raise ResumeError(f"optimizer state '{path}': no such file")
    try:
        metadata, tensors = _read(path)
    except Exception as error:
        raise ResumeError(f"optimizer state '{label}' is not readable ({error})") from None
    if metadata.get("format") != _FORMAT:
        raise ResumeError(f"'{label}' is not an optimizer state of this extension")
    if metadata.get("lora_hash") != lora_hash:
        raise ResumeError(f"optimizer state '{label}' (step {metadata.get('step')}) belongs to another "
                          "LoRA file (a later or earlier save of that run)")
    if metadata.get("optimizer") != type(optimizer).__name__:
        raise ResumeError(f"optimizer state '{label}' is for {metadata.get('optimizer')}, this run uses "
                          f"{type(optimizer).__name__}")
    values = json.loads(metadata["state"])
    params = _optimizer_params(optimizer)
    if sorted(values) != sorted(names[id(p)] for p in params):
        raise ResumeError(f"optimizer state '{label}' is for other layers than these settings train")
    state = {}
    for index, param in enumerate(params):
        name = names[id(param)]
        if values[name]:  # a parameter never stepped has none (torch 2.1.2 fails on an empty one)
            state[index] = {key: tensors[f"state/{key}/{name}"] if value is None else value
                            for key, value in values[name].items()}
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    with torch.no_grad():
        for param in params:
            param.copy_(tensors[f"param/{names[id(param)]}"].to(param.dtype))
    torch_compat.load_scaler_state(scaler, json.loads(metadata.get("scaler") or "null"))
    return int(metadata["step"])


def lora_hash_of_state(path: str) -> Optional[str]:
    """The LoRA hash an optimizer state belongs to (None when it is not one)."""
    try:
        metadata, _ = _read(path, tensors=False)
    except Exception:
        return None
    return metadata.get("lora_hash") if metadata.get("format") == _FORMAT else None


def find_state(lora_path: str, run_root: str) -> Optional[str]:
    """The ``optimizer.safetensors`` among ``run_root``'s run folders (one level down) that
    belongs to the LoRA at ``lora_path``, or None; lets a host resume a LoRA from the Lora
    folder exactly without knowing which run wrote it."""
    wanted = export.addnet_hash(lora_path)
    for candidate in sorted(glob.glob(os.path.join(glob.escape(run_root), "*", OPTIMIZER_FILE))):
        if lora_hash_of_state(candidate) == wanted:
            return candidate
    return None


__all__ = ["OPTIMIZER_FILE", "ResumeError", "ResumeSource", "read_lora", "load_lora",
           "trainable_names", "save_state", "load_state", "lora_hash_of_state", "find_state"]
