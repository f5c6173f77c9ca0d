"""The trained adapter as a kohya-format ``.safetensors`` file A1111's Lora loader applies
exactly, plus the ``<name>.json`` sidecar its card reads. Every file appears atomically.

Which tensors a layer's adapter writes, and its alpha, is its network type's (``networks/``):
each is what A1111 1.10.1 applies exactly (``tests/a1111_lora.py`` re-implements its loader).
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import safetensors.torch
import torch

from . import networks
from .adapters import Adapters, Layer
from .config import TrainConfig, name_problem

if TYPE_CHECKING:
    from PIL import Image

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

#: Stems A1111 would treat as the same network (or whose sidecar/preview would attach to it).
_NAME_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".json", ".png", ".preview.png")

#: sd_version → (ss_base_model_version, ss_v2, modelspec architecture, sidecar "sd version")
_VERSIONS = {
    "sd1": ("sd_v1", "False", "stable-diffusion-v1", "SD1"),
    "sd2": ("sd_v2", "True", "stable-diffusion-v2-512", "SD2"),
    "sd2-v": ("sd_v2", "True", "stable-diffusion-v2-768-v", "SD2"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base", "SDXL"),
}


@dataclass(frozen=True)
class ExportResult:
    path: str
    sidecar_path: str
    name: str


def layer_tensors(layer: Layer, network: str) -> dict[str, torch.nn.Parameter]:
    """kohya suffix → the adapter's own parameter (what the file holds for this layer, and
    what a resumed run loads back into)."""
    return networks.get(network).tensors(layer.wrapper)


def kohya_tensors(adapters: Adapters, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """``<kohya_name>.<suffix>`` → CPU tensor in ``dtype``; ``.alpha`` stays a float32 scalar
    so the scale A1111 computes is exact for any alpha, and the type's ``fp32_tensors`` stay
    float32 too."""
    network = networks.get(adapters.network)
    tensors: dict[str, torch.Tensor] = {}
    for layer in adapters.layers:
        prefix = layer.target.kohya_name
        for suffix, t in layer_tensors(layer, adapters.network).items():
            kept = torch.float32 if suffix in network.fp32_tensors else dtype
            tensors[f"{prefix}.{suffix}"] = t.detach().to("cpu", kept).contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(network.file_alpha(layer.rank, layer.alpha), dtype=torch.float32)
    return tensors


def _hash_after_header(data: bytes) -> str:
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_length:]).hexdigest()


def addnet_hash(path: str) -> str:
    """kohya's / A1111's "addnet" hash (``sshs_model_hash``): sha256 of a safetensors file's
    bytes after the 8-byte header length and the JSON header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_length)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unique_name(folder: str, name: str, overwrite: bool) -> str:
    """``name`` if free (or ``overwrite``), else the first free ``name-1``, ``name-2``, ..."""
    if overwrite:
        return name
    candidate, n = name, 0
    while any(os.path.exists(os.path.join(folder, candidate + s)) for s in _NAME_SUFFIXES):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` for a temp file in the target's folder, flush it to disk and
    move it over ``path`` in one step: readers see the old file or the whole new one, never a
    partial one. On any failure the temp file is removed and nothing else changes."""
    folder, base = os.path.split(os.path.abspath(path))
    # A dot name ending in .tmp: hidden, and not a model file for A1111's folder listing.
    # (Not tempfile.mkstemp: its 0600 mode would carry over to the final file.)
    temp = os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def _write_bytes(data: bytes) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)
    return write


def png_base64(image: "Image.Image") -> str:
    """A PNG of ``image`` as base64 text (the cover image's metadata, the API's images)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def version_info(sd_version: str) -> tuple[str, str, str, str]:
    """(ss_base_model_version, ss_v2, modelspec architecture, sidecar "sd version") of an
    ``sd_version`` tag ("sd1", "sd2", "sd2-v", "sdxl")."""
    try:
        return _VERSIONS[sd_version.lower()]
    except KeyError:
        raise ValueError(f"sd_version must be one of {', '.join(_VERSIONS)}, got {sd_version!r}") from None


def describe(config: TrainConfig, steps_done: int, processes: int = 1) -> str:
    """The hyperparameters in one readable line (the sidecar's "notes")."""
    te = f"text encoder lr {config.text_encoder_lr:g}" if config.train_text_encoder else "text encoder frozen"
    reg = (f"regularization {config.regularization:g} with '{config.class_prompt}'"
           if config.prior_preservation else "no regularization")
    network = networks.get(config.network)
    alphas = (f"alpha not applied ({network.label})" if not network.applies_alpha
              else f"alpha {config.alpha:g}, conv alpha {config.conv_alpha:g}")
    pivotal = (f", pivotal tuning: embedding '{config.trigger.strip()}' bundled, lr {config.embedding_lr:g}"
               if config.pivotal else "")
    return (f"lora-dreambooth: {config.network}, rank {config.rank}, conv rank {config.conv_rank}, "
            f"{alphas}; {steps_done} of "
            f"{config.steps} steps, batch {config.batch_size} × accumulation "
            f"{config.gradient_accumulation}{_processes(processes)}, lr {config.learning_rate:g} ({config.lr_schedule}), "
            f"{te}{pivotal}, {config.optimizer}, resolution {config.resolution}, {reg}, seed {config.seed}")


def _processes(processes: int) -> str:
    return f" × {processes} processes" if processes > 1 else ""


def lora_metadata(adapters: Adapters, config: TrainConfig, name: str, *, sd_version: str,
                  steps_done: int, num_train_images: int, tag_frequency: dict,
                  cover_image: "Optional[Image.Image]" = None,
                  extra_metadata: Optional[dict] = None, processes: int = 1) -> dict[str, str]:
    """kohya's ``ss_*`` and SAI ``modelspec.*`` fields, all strings. ``extra_metadata`` is
    added first, so it cannot override these (``sshs_model_hash`` is added by ``save_lora``).
    ``processes``: data-parallel processes; the samples per step, kohya's
    ``ss_total_batch_size``, are batch × accumulation × processes."""
    base_version, v2, architecture, _ = version_info(sd_version)
    network = networks.get(adapters.network)
    te_lr = config.text_encoder_lr if config.train_text_encoder else 0.0
    meta: dict[str, Any] = dict(extra_metadata or {})
    meta.update({
        "ss_output_name": name,
        "ss_network_module": network.module,
        "ss_network_dim": config.rank,
        "ss_network_alpha": network.file_alpha(config.rank, config.alpha),
        "ss_base_model_version": base_version,
        "ss_v2": v2,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_num_train_images": num_train_images,
        "ss_steps": steps_done,
        "ss_max_train_steps": config.steps,
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate,
        "ss_text_encoder_lr": te_lr,
        "ss_network_train_unet_only": not config.train_text_encoder,
        "ss_batch_size_per_device": config.batch_size,
        "ss_total_batch_size": config.batch_size * config.gradient_accumulation * processes,
        "ss_gradient_accumulation_steps": config.gradient_accumulation,
        "ss_lr_scheduler": config.lr_schedule,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": config.optimizer,
        "ss_seed": config.seed,
        "ss_prior_loss_weight": config.regularization,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_noise_offset": config.noise_offset,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_shuffle_caption": config.shuffle_tags,
        "ss_keep_tokens": config.keep_tokens,
        "ss_caption_tag_dropout_rate": config.tag_dropout,
        "ss_training_comment": config.comment,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                     if sd_version.lower() == "sdxl" else "diffusers"),
        "modelspec.title": name,
        "modelspec.trigger_phrase": config.trigger,
        "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
    })
    network_args = network.network_args(config.conv_rank, config.conv_alpha)
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    if cover_image is not None:
        meta["ssmd_cover_images"] = json.dumps([png_base64(cover_image)])
    return {key: str(value) for key, value in meta.items()}


def save_lora(adapters: Adapters, config: TrainConfig, folder: str, *, sd_version: str, steps_done: int,
              num_train_images: int, tag_frequency: dict, cover_image: "Optional[Image.Image]" = None,
              extra_metadata: Optional[dict] = None,
              embedding: Optional[dict[str, torch.Tensor]] = None, processes: int = 1) -> ExportResult:
    """Write ``<folder>/<name>.safetensors`` and ``<name>.json``.

    ``name`` is ``config.output_name``, or ``name-1``, ``name-2``... when taken and
    ``config.overwrite`` is off. ``sd_version``: "sd1", "sd2", "sd2-v" (768 v-prediction) or
    "sdxl", any case. Tensors are saved in ``config.save_dtype``; ``embedding`` (pivotal
    tuning's ``bundle_emb.*`` tensors, see ``embedding.Pivot.tensors``) as they are.
    ``processes``: how many data-parallel processes trained it (metadata and notes)."""
    os.makedirs(folder, exist_ok=True)
    name = unique_name(folder, config.output_name, config.overwrite)
    tensors = kohya_tensors(adapters, SAVE_DTYPES[config.save_dtype])
    tensors.update(embedding or {})
    metadata = lora_metadata(adapters, config, name, sd_version=sd_version, steps_done=steps_done,
                             num_train_images=num_train_images, tag_frequency=tag_frequency,
                             cover_image=cover_image, extra_metadata=extra_metadata, processes=processes)
    sidecar = {"description": "", "sd version": version_info(sd_version)[3], "activation text": config.trigger,
               "preferred weight": 1.0, "negative text": "", "notes": describe(config, steps_done, processes)}
    return _write_lora(folder, name, tensors, metadata, sidecar)


def _with_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The file's bytes with ``sshs_model_hash`` in its header. The hash covers only the bytes
    after the header, which metadata does not change: serialise, hash, and serialise again
    with the hash in the header."""
    metadata = dict(metadata, sshs_model_hash=_hash_after_header(safetensors.torch.save(tensors, metadata)))
    data = safetensors.torch.save(tensors, metadata)
    if _hash_after_header(data) != metadata["sshs_model_hash"]:
        raise RuntimeError("safetensors laid the tensors out differently on the second pass")
    return data


def _write_lora(folder: str, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                sidecar: dict) -> ExportResult:
    """``<name>.safetensors`` (hashed) and its sidecar, each atomically; a LoRA whose sidecar
    fails is removed again unless it replaced an existing file."""
    path = os.path.join(folder, name + ".safetensors")
    sidecar_path = os.path.join(folder, name + ".json")
    data = _with_hash(tensors, metadata)
    sidecar_bytes = json.dumps(sidecar, indent=2, ensure_ascii=False).encode("utf-8")
    existed = os.path.exists(path)
    atomic_write(path, _write_bytes(data))
    try:
        atomic_write(sidecar_path, _write_bytes(sidecar_bytes))
    except BaseException:
        if not existed:  # no half-saved LoRA left behind
            os.remove(path)
        raise
    return ExportResult(path, sidecar_path, name)


def promote(path: str, lora_dir: str, overwrite: bool = False, name: str = "") -> ExportResult:
    """Copy a LoRA file (e.g. a run's ``<name>-step00200.safetensors``) and its sidecar into
    ``lora_dir`` under ``name`` (default: the file's stem; ``name-1``... when taken unless
    ``overwrite``), with ``ss_output_name`` / ``modelspec.title`` set to the new name so
    ``<lora:name:w>`` finds it, and ``sshs_model_hash`` recomputed. Tensors are copied as
    they are (read with safetensors: nothing is unpickled). Without a sidecar beside the
    file, a minimal one is written from the metadata."""
    if not path.lower().endswith(".safetensors") or not os.path.isfile(path):
        raise ValueError(f"not a .safetensors file: {path}")
    stem = os.path.basename(path)[:-len(".safetensors")]
    problem = name_problem(name.strip() or stem)
    if problem:
        raise ValueError(problem)
    with safetensors.safe_open(path, "pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    os.makedirs(lora_dir, exist_ok=True)
    final = unique_name(lora_dir, name.strip() or stem, overwrite)
    if os.path.abspath(os.path.join(lora_dir, final + ".safetensors")) == os.path.abspath(path):
        raise ValueError(f"{path} is already in the Lora folder under that name")
    metadata.update({"ss_output_name": final, "modelspec.title": final})
    sidecar_source = path[:-len(".safetensors")] + ".json"
    if os.path.isfile(sidecar_source):
        with open(sidecar_source, encoding="utf-8") as f:
            sidecar = json.load(f)
    else:
        sidecar = _sidecar_from_metadata(metadata)
    return _write_lora(lora_dir, final, tensors, metadata, sidecar)


def _sidecar_from_metadata(metadata: dict[str, str]) -> dict:
    version = next((v[3] for v in _VERSIONS.values() if v[0] == metadata.get("ss_base_model_version")), "SD1")
    return {"description": "", "sd version": version,
            "activation text": metadata.get("modelspec.trigger_phrase", ""), "preferred weight": 1.0,
            "negative text": "", "notes": ""}
