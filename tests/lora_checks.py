"""Every check an exported LoRA file must pass, for a file written by a whole run (headless, or
by several processes): header, hash, sidecar, tensors, and what A1111 computes from it."""
from __future__ import annotations

import copy
import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from a1111_lora import assert_a1111_exact
from lora_dreambooth import resume
from lora_dreambooth.adapters import inject
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.embedding import install_pivot
from lora_dreambooth.export import SAVE_DTYPES, addnet_hash
from lora_dreambooth.targets import find_targets


def assert_lora_file_passes_export_checks(path: str, model: torch.nn.Module, config: TrainConfig) -> dict[str, str]:
    """``path`` (trained with ``config`` on an SD1 ``model``) is what the export promises;
    returns its metadata."""
    folder, stem = os.path.split(path[:-len(".safetensors")])
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_output_name"] == metadata["modelspec.title"] == stem
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == str(config.rank)
    assert metadata["modelspec.trigger_phrase"] == config.trigger
    raw = open(path, "rb").read()
    header = int.from_bytes(raw[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest() == addnet_hash(path)

    sidecar = json.load(open(os.path.join(folder, stem + ".json"), encoding="utf-8"))
    assert set(sidecar) == {"description", "sd version", "activation text", "preferred weight", "negative text",
                            "notes"}
    assert sidecar["sd version"] == "SD1" and sidecar["activation text"] == config.trigger

    tensors = load_file(path)
    assert not any("lora_A" in k or "lora_B" in k for k in tensors)
    assert all(v.dtype == SAVE_DTYPES[config.save_dtype] for k, v in tensors.items()
               if not k.endswith(".alpha") and not k.startswith("bundle_emb."))
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]

    # The file loads back into fresh adapters (same layers, shapes, alphas), and A1111's
    # arithmetic on its tensors gives what those adapters compute.
    fresh = copy.deepcopy(model)
    adapters = inject(fresh, find_targets(fresh, config.network, config.train_text_encoder), config)
    pivot = install_pivot(fresh, config.trigger, config.class_prompt) if config.pivotal else None
    try:
        resume.load_lora(resume.read_lora(path), adapters, pivot, config, "sd1")
        assert_a1111_exact(adapters, tensors)
    finally:
        if pivot is not None:
            pivot.remove()
        adapters.remove()
    return metadata
