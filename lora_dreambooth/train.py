"""Training a LoRA: DreamBooth with prior preservation, on the model in place.

One *step* is one optimizer update of ``batch_size × gradient_accumulation`` samples (the
lecture's definition). Each micro-batch: sample latents from the (cached) VAE posterior, add
noise at random timesteps with the model's own schedule, predict with the adapted UNet, and
take the MSE against the noise (or velocity for "v" models), min-SNR weighted if asked; with
prior preservation the class half of the batch is weighted by the regularization strength.

With ``pivotal`` the trigger also gets a new embedding trained alongside (``embedding``);
with ``resume_from`` a run continues an earlier LoRA of ours, step count, LR schedule, data
order and (when its run folder kept it) optimizer state included (``resume``).

Whatever happens the model ends as it began: adapters removed, flags restored, and a
snapshot comparison proves it. Stopping saves what was trained; an error writes nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import resume
from .adapters import Adapters, inject
from .config import ConfigError, TrainConfig
from .data import DreamBoothDataset
from .distributed import SingleProcess
from .embedding import Pivot, install_pivot
from .guard import ModelSnapshot
from .loop import PHASES, Progress, TrainCallbacks, TrainingLoop, report, save_adapters
from .model import make_backend
from .run_files import RunFiles
from .targets import find_targets

__all__ = ["PHASES", "Progress", "TrainCallbacks", "TrainResult", "TrainingError", "train_lora"]


class TrainingError(RuntimeError):
    """Training failed: the model was restored and nothing was written."""


@dataclass
class TrainResult:
    path: Optional[str]          # the .safetensors written; None when stopped before step 1
    sidecar_path: Optional[str]  # <name>.json
    name: Optional[str]          # final name (name, name-1, ...)
    steps_done: int              # steps of this run (the file records resumed_steps + steps_done)
    cancelled: bool
    losses: list[float]
    previews: list[str]          # preview image paths in run_dir
    run_dir: str
    skipped: list = field(default_factory=list)  # data.Skipped of unusable images
    resumed_steps: int = 0       # steps of the LoRA this run continued (0: a new LoRA)


def train_lora(model, config: TrainConfig, lora_dir: str, run_dir: str,
               callbacks: Optional[TrainCallbacks] = None, snapshot: Optional[ModelSnapshot] = None,
               parallel: Optional[SingleProcess] = None) -> TrainResult:
    """Train an adapter in place on ``model`` (ldm LatentDiffusion, plain or A1111-wrapped, or
    SDXL's sgm DiffusionEngine as A1111 holds it),
    write ``<lora_dir>/<name>.safetensors`` + ``<name>.json``, and previews / ``loss.csv`` /
    ``config.json`` (and ``optimizer.safetensors``) in ``run_dir``. Stopping saves what was
    trained; any exception restores the model, writes nothing in ``lora_dir`` and raises
    ``TrainingError``. Bad data or an unreadable ``resume_from`` fail before the model is
    touched (``NoImagesError``, ``resume.ResumeError``). ``snapshot``: the caller's
    ``ModelSnapshot`` of the model as it is now (else one is taken); the run's after-check
    is left in its ``verified``, so the caller need not read the weights again. ``parallel``:
    this process's part in a data-parallel run (``distributed.DataParallel``; only its main
    process writes files); default: the only process."""
    config.validate()
    parallel = parallel or SingleProcess()
    if parallel.num_processes > 1 and config.buckets:
        # A bucket's last batch may be smaller than the processes: it cannot be shared evenly.
        raise ConfigError([f"aspect-ratio buckets cannot be trained on {parallel.num_processes} processes "
                           "yet: turn buckets off, or run one process"])
    callbacks = callbacks or TrainCallbacks()
    log = callbacks.on_log or (lambda message: None)
    report(callbacks, Progress(0, config.steps, float("nan"), 0.0, 0.0, 0.0, "reading"))
    dataset = DreamBoothDataset(config, on_progress=log)
    for skipped in dataset.skipped:
        log(f"skipped {os.path.basename(skipped.path)}: {skipped.reason}")
    source = resume.read_lora(config.resume_from.strip()) if config.resume_from.strip() else None
    backend = make_backend(model)
    if parallel.is_main:
        os.makedirs(run_dir, exist_ok=True)
    run = RunFiles(run_dir, config, write=parallel.is_main)

    snapshot = snapshot if snapshot is not None else ModelSnapshot.take(model)
    adapters: Optional[Adapters] = None
    pivot: Optional[Pivot] = None
    try:
        model.requires_grad_(False)  # only adapter weights get gradients
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # adapter initialisation is reproducible
            adapters = inject(model, find_targets(model, config.network, config.train_text_encoder), config)
        if config.pivotal:
            pivot = install_pivot(model, config.trigger, config.class_prompt)
            log(f"pivotal tuning: '{pivot.trigger}' gets {pivot.vector_count} trainable vector(s), one per token, "
                f"starting from '{config.class_prompt.strip() or pivot.trigger}'")
        if source is not None:
            resume.load_lora(source, adapters, pivot, config, backend.sd_version)
            log(f"resuming {source.path} after its {source.steps} steps")
        loop = TrainingLoop(backend, adapters, pivot, dataset, config, callbacks, run, source, parallel)
        steps_done, cancelled = loop.run()
        result = TrainResult(None, None, None, steps_done, cancelled, loop.losses, run.previews, run_dir,
                             dataset.skipped, loop.start)
        if steps_done > 0 and parallel.is_main:
            step = loop.start + steps_done
            report(callbacks, Progress(step, loop.total, loop.last_loss, 0.0, 0.0, 0.0, "saving"))
            os.makedirs(lora_dir, exist_ok=True)
            saved = save_adapters(adapters, pivot, config, lora_dir, backend, dataset, step, loop.total,
                          run.last_preview, processes=parallel.num_processes)
            loop.save_state(saved.path, step)
            result.path, result.sidecar_path, result.name = saved.path, saved.sidecar_path, saved.name
            log(f"saved {saved.path} after {step} steps")
        elif steps_done == 0:
            log("stopped before the first step: nothing to save")
        return result
    except Exception as error:
        raise TrainingError(f"training failed: {error}") from error
    finally:
        if pivot is not None:
            pivot.remove()
        if adapters is not None:
            adapters.remove()
        snapshot.restore_flags(model)
        report(callbacks, Progress(0, config.steps, float("nan"), 0.0, 0.0, 0.0, "verifying"))
        differences = snapshot.verify(model)
        if differences:  # never expected; loud if it ever happens
            raise TrainingError("the model was not restored exactly: " + "; ".join(differences[:5]))
