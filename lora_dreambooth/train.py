"""The training loop: DreamBooth with prior preservation, on the model in place.

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

import contextlib
import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from PIL import Image

from . import export, resume
from .adapters import Adapters, inject
from .config import TrainConfig
from .data import DreamBoothDataset, MicroBatch
from .embedding import Pivot, install_pivot
from .guard import ModelSnapshot
from .model import Backend, Conditioning, cat_conditioning, detach_conditioning, make_backend
from .preview import render_preview
from .targets import find_targets


class TrainingError(RuntimeError):
    """Training failed: the model was restored and nothing was written."""


@dataclass
class Progress:
    step: int            # optimizer updates done (a resumed run counts on from the file's)
    total: int           # config.steps (plus the resumed file's steps)
    loss: float          # mean loss of the last step
    lr: float            # current UNet learning rate
    samples_per_s: float
    eta_s: float
    phase: str = "training"  # "caching" | "training" | "saving"


@dataclass
class TrainCallbacks:
    on_progress: Optional[Callable[[Progress], None]] = None
    # Renders a preview at `step` with the adapter active; None → the engine's own sampler.
    render_preview: Optional[Callable[[int], Image.Image]] = None
    on_preview: Optional[Callable[[int, Image.Image, str], None]] = None  # (step, image, saved path)
    should_stop: Callable[[], bool] = field(default=lambda: False)  # checked every micro-batch
    on_log: Optional[Callable[[str], None]] = None


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


class _Stopped(Exception):
    """should_stop() said yes in the middle of a step."""


def train_lora(model, config: TrainConfig, lora_dir: str, run_dir: str,
               callbacks: Optional[TrainCallbacks] = None) -> TrainResult:
    """Train an adapter in place on ``model`` (ldm LatentDiffusion, plain or A1111-wrapped, or
    SDXL's sgm DiffusionEngine as A1111 holds it),
    write ``<lora_dir>/<name>.safetensors`` + ``<name>.json``, and previews / ``loss.csv`` /
    ``config.json`` (and ``optimizer.safetensors``) in ``run_dir``. Stopping saves what was
    trained; any exception restores the model, writes nothing in ``lora_dir`` and raises
    ``TrainingError``. Bad data or an unreadable ``resume_from`` fail before the model is
    touched (``NoImagesError``, ``resume.ResumeError``)."""
    config.validate()
    callbacks = callbacks or TrainCallbacks()
    log = callbacks.on_log or (lambda message: None)
    dataset = DreamBoothDataset(config, on_progress=log)
    for skipped in dataset.skipped:
        log(f"skipped {os.path.basename(skipped.path)}: {skipped.reason}")
    source = resume.read_lora(config.resume_from.strip()) if config.resume_from.strip() else None
    backend = make_backend(model)
    os.makedirs(run_dir, exist_ok=True)
    run = _RunFiles(run_dir, config)

    snapshot = ModelSnapshot.take(model)
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
        loop = _Loop(backend, adapters, pivot, dataset, config, callbacks, run, source)
        steps_done, cancelled = loop.run()
        result = TrainResult(None, None, None, steps_done, cancelled, loop.losses, run.previews, run_dir,
                             dataset.skipped, loop.start)
        if steps_done > 0:
            step = loop.start + steps_done
            _report(callbacks, Progress(step, loop.total, loop.last_loss, 0.0, 0.0, 0.0, "saving"))
            os.makedirs(lora_dir, exist_ok=True)
            saved = _save(adapters, pivot, config, lora_dir, backend, dataset, step, loop.total,
                          run.last_preview)
            loop.save_state(saved.path, step)
            result.path, result.sidecar_path, result.name = saved.path, saved.sidecar_path, saved.name
            log(f"saved {saved.path} after {step} steps")
        else:
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
        differences = snapshot.differences(model)
        if differences:  # never expected; loud if it ever happens
            raise TrainingError("the model was not restored exactly: " + "; ".join(differences[:5]))


def _save(adapters: Adapters, pivot: Optional[Pivot], config: TrainConfig, folder: str, backend: Backend,
          dataset: DreamBoothDataset, step: int, total: int, cover: Optional[Image.Image],
          name: Optional[str] = None) -> export.ExportResult:
    """The LoRA after ``step`` of ``total`` steps, resumed ones included (the file describes
    the whole training: ``ss_steps``, ``ss_max_train_steps``)."""
    changes: dict = {"steps": total}
    if name is not None:
        changes.update(name=name, overwrite=True)
    return export.save_lora(adapters, dataclasses.replace(config, **changes), folder,
                            sd_version=backend.sd_version, steps_done=step,
                            num_train_images=dataset.num_instance_images, tag_frequency=dataset.tag_frequency,
                            cover_image=cover, embedding=pivot.tensors() if pivot is not None else None)


def _report(callbacks: TrainCallbacks, progress: Progress) -> None:
    if callbacks.on_progress:
        callbacks.on_progress(progress)


def prior_preservation_loss(per_sample: torch.Tensor, is_class: torch.Tensor, strength: float) -> torch.Tensor:
    """DreamBooth's loss: instance MSE + strength × class MSE (class samples present only
    with prior preservation)."""
    loss = per_sample[~is_class].mean()
    if is_class.any():
        loss = loss + strength * per_sample[is_class].mean()
    return loss


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR for ε-prediction, min(SNR, γ) / (SNR + 1)
    for v-prediction; all ones when γ is 0 (off)."""
    if not gamma:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / (snr + 1 if parameterization == "v" else snr)


class _RunFiles:
    """The run folder: config.json, loss.csv (one row per step) and preview images."""

    def __init__(self, run_dir: str, config: TrainConfig):
        self.run_dir = run_dir
        self.previews: list[str] = []
        self.last_preview: Optional[Image.Image] = None
        export.atomic_write(os.path.join(run_dir, "config.json"),
                            lambda tmp: _write_json(tmp, config.to_dict()))
        self.loss_path = os.path.join(run_dir, "loss.csv")
        with open(self.loss_path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["step", "loss", "lr"])

    def add_loss(self, step: int, loss: float, lr: float) -> None:
        with open(self.loss_path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([step, f"{loss:.6f}", f"{lr:.3e}"])

    def add_preview(self, step: int, image: Image.Image) -> str:
        path = os.path.join(self.run_dir, f"preview-{step:05d}.png")
        export.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        self.previews.append(path)
        self.last_preview = image
        return path


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


class _Loop:
    """Optimizer, schedules and the step loop for one run.

    Steps are counted from ``start`` (the resumed file's steps, else 0) to ``total``; the LR
    schedule runs over all of them, so a resumed run continues where the file's run was."""

    def __init__(self, backend: Backend, adapters: Adapters, pivot: Optional[Pivot], dataset: DreamBoothDataset,
                 config: TrainConfig, callbacks: TrainCallbacks, run: _RunFiles,
                 source: Optional[resume.ResumeSource] = None):
        self.backend, self.adapters, self.pivot, self.dataset = backend, adapters, pivot, dataset
        self.config, self.callbacks, self.run_files = config, callbacks, run
        self.log = callbacks.on_log or (lambda message: None)
        self.start = source.steps if source is not None else 0
        self.total = self.start + config.steps
        self.generator = torch.Generator().manual_seed(config.seed)
        self.noise_scheduler = backend.training_scheduler()
        self.losses: list[float] = []
        self.last_loss = float("nan")
        self.autocast_dtype = _autocast_dtype(config.precision, backend)
        self.optimizer = self._make_optimizer()
        use_scaler = self.autocast_dtype == torch.float16 and backend.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.names = resume.trainable_names(adapters, pivot)
        if source is not None:
            self._load_state(source)
        for group in self.optimizer.param_groups:  # what a scheduler starting past step 0 needs
            group["initial_lr"] = group["lr"]
        self.lr_scheduler = get_scheduler(config.lr_schedule, self.optimizer,
                                          num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=self.total, last_epoch=self.start - 1)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": self.adapters.parameters_for("unet"), "lr": self.config.learning_rate}]
        if self.config.train_text_encoder:
            groups.append({"params": self.adapters.parameters_for("te"), "lr": self.config.text_encoder_lr})
        if self.pivot is not None:
            # No weight decay: it would pull the vectors towards zero, off the scale of the
            # token embeddings the text encoder was trained on.
            groups.append({"params": self.pivot.parameters(), "lr": self.config.embedding_lr, "weight_decay": 0.0})
        if self.config.optimizer == "adamw8bit":
            bnb = _bitsandbytes_on_cuda(self.backend.device)
            if bnb is not None:
                return bnb.optim.AdamW8bit(groups, weight_decay=self.config.weight_decay)
            self.log("8-bit AdamW needs bitsandbytes and a CUDA GPU: using AdamW instead")
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)

    # --- the optimizer state, for resuming ----------------------------------------------

    def _load_state(self, source: resume.ResumeSource) -> None:
        """The optimizer state of the run that wrote ``source``: ``resume_optimizer`` (an error
        if it does not fit), else ``optimizer.safetensors`` beside the file when it is that
        file's (otherwise the optimizer starts afresh and says so)."""
        given = self.config.resume_optimizer.strip()
        path = given or os.path.join(os.path.dirname(os.path.abspath(source.path)), resume.OPTIMIZER_FILE)
        if not given and not os.path.isfile(path):
            self.log("no optimizer state beside the resumed file: the optimizer starts afresh")
            return
        try:
            step = resume.load_state(path, self.optimizer, self.names, source.hash, self.scaler)
        except resume.ResumeError as error:
            if given:
                raise
            self.log(f"{error}: the optimizer starts afresh")
            return
        self.log(f"optimizer state of step {step} loaded from {path}")

    def save_state(self, lora_path: str, step: int) -> None:
        """``optimizer.safetensors`` in the run folder, tied to the LoRA just written there or
        in the Lora folder (``save_optimizer``). The LoRA is the product: a state that cannot
        be written (disk full) is reported, not fatal."""
        if not self.config.save_optimizer:
            return
        try:
            resume.save_state(os.path.join(self.run_files.run_dir, resume.OPTIMIZER_FILE), self.optimizer,
                              self.names, step, export.addnet_hash(lora_path), self.scaler)
        except OSError as error:
            self.log(f"optimizer state not saved ({error}): a resume of this file starts a fresh optimizer")

    # --- conditioning --------------------------------------------------------------------

    def _conditioning(self, batch: MicroBatch, cache: Optional[dict[str, Conditioning]]) -> Conditioning:
        """The prompts' conditioning (cached per prompt while the text encoders and the
        trigger's embedding are frozen) completed with the batch's image sizes and crops (SDXL)."""
        if cache is None:  # text encoder or embedding trains: encode with gradients every time
            cond = self.backend.encode_prompts(batch.prompts)
        else:
            cond = cat_conditioning([cache[p] for p in batch.prompts])
        return self.backend.conditioning(cond, batch)

    def _prompt_cache(self) -> Optional[dict[str, Conditioning]]:
        if self.config.train_text_encoder or self.pivot is not None:
            return None
        with torch.no_grad(), self._autocast():
            return {p: detach_conditioning(self.backend.encode_prompts([p])) for p in self.dataset.prompts()}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.backend.device.type, dtype=self.autocast_dtype)

    # --- one micro-batch -----------------------------------------------------------------

    def _moments(self, batch: MicroBatch) -> torch.Tensor:
        return batch.moments if batch.moments is not None else self.backend.encode_moments(batch.pixels)

    def _noise(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion noise (with the offset) and timesteps for latents of ``shape``: what a
        micro-batch draws from the generator after its latents' own sampling noise."""
        n = shape[0]
        noise = torch.randn(shape, generator=self.generator)
        if self.config.noise_offset:
            noise += self.config.noise_offset * torch.randn((n, shape[1], 1, 1), generator=self.generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=self.generator)
        return noise, timesteps

    def _loss(self, batch: MicroBatch, cond_cache: Optional[dict[str, Conditioning]]) -> torch.Tensor:
        device = self.backend.device
        latents = self.backend.latents_from_moments(self._moments(batch), self.generator).float()
        noise, timesteps = self._noise(latents.shape)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.backend.parameterization == "eps" else \
            self.noise_scheduler.get_velocity(latents, noise, timesteps)
        with self._autocast():
            cond = self._conditioning(batch, cond_cache)
            prediction = self.backend.predict(noisy, timesteps, cond)
        per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        per_sample = per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.config.min_snr_gamma,
                                                  self.backend.parameterization)
        return prior_preservation_loss(per_sample, batch.is_class.to(device), self.config.regularization)

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> tuple[int, bool]:
        config = self.config
        if self.dataset.cacheable:
            self.dataset.cache_latents(self.backend.encode_moments, on_progress=self._caching_progress)
        cond_cache = self._prompt_cache()
        batches = self.dataset.micro_batches(config.batch_size, self.generator)
        self._replay(batches, self.start)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        samples_per_step = config.batch_size * config.gradient_accumulation
        started = time.perf_counter()
        step = self.start
        with self.backend.gradient_checkpointing(config.gradient_checkpointing):
            try:
                for step in range(self.start + 1, self.total + 1):
                    lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step uses
                    loss = self._step(batches, cond_cache, params)
                    self.losses.append(loss)
                    self.last_loss = loss
                    self.run_files.add_loss(step, loss, lr)
                    elapsed = time.perf_counter() - started
                    done = step - self.start
                    rate = done * samples_per_step / elapsed if elapsed > 0 else 0.0
                    eta = (self.total - step) * elapsed / done
                    _report(self.callbacks, Progress(step, self.total, loss, lr, rate, eta))
                    self._after_step(step)
            except _Stopped:
                self.log(f"stopped after {step - 1} of {self.total} steps")
                return step - 1 - self.start, True
        return config.steps, False

    def _replay(self, batches: Iterator[MicroBatch], steps: int) -> None:
        """Bring the generator and the data stream to where they were after ``steps`` steps
        of the run being resumed, by drawing what each of its micro-batches drew (order,
        flips and augmentation in ``next``, then the latents' sampling noise as
        ``Backend.latents_from_moments`` draws it, then ``_noise``), with no model work but
        VAE encodes of augmented images. With the same seed, data and batch settings the
        resumed run then sees exactly the samples, noise and timesteps of an uninterrupted one."""
        with torch.no_grad():
            for _ in range(steps * self.config.gradient_accumulation):
                mean = torch.chunk(self._moments(next(batches)), 2, dim=1)[0]
                torch.randn(mean.shape, generator=self.generator)
                self._noise(mean.shape)

    def _step(self, batches: Iterator[MicroBatch], cond_cache, params: list[torch.nn.Parameter]) -> float:
        accumulation = self.config.gradient_accumulation
        total = torch.zeros(())
        for _ in range(accumulation):
            if self.callbacks.should_stop():
                self.optimizer.zero_grad(set_to_none=True)
                raise _Stopped()
            loss = self._loss(next(batches), cond_cache) / accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = total.to(loss.device) + loss.detach()  # one device sync per step, not per micro-batch
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item()

    def _after_step(self, step: int) -> None:
        config = self.config
        if config.preview_every and (step % config.preview_every == 0 or step == self.total):
            image = self._render_preview(step)
            path = self.run_files.add_preview(step, image)
            if self.callbacks.on_preview:
                self.callbacks.on_preview(step, image, path)
        if config.save_every and step % config.save_every == 0 and step < self.total:
            saved = _save(self.adapters, self.pivot, config, self.run_files.run_dir, self.backend, self.dataset,
                          step, self.total, self.run_files.last_preview, name=f"{config.output_name}-step{step:05d}")
            self.save_state(saved.path, step)
            self.log(f"saved intermediate {saved.path}")

    def _render_preview(self, step: int) -> Image.Image:
        if self.callbacks.render_preview:
            return self.callbacks.render_preview(step)
        config = self.config
        with self._autocast():
            return render_preview(self.backend, config.effective_preview_prompt,
                                  config.preview_negative_prompt, seed=config.preview_seed,
                                  steps=config.preview_steps, cfg_scale=config.preview_cfg,
                                  width=config.resolution, height=config.resolution)

    def _caching_progress(self, done: int, total: int) -> None:
        _report(self.callbacks, Progress(self.start, self.total, float("nan"), 0.0, 0.0, 0.0, "caching"))


def _autocast_dtype(precision: str, backend: Backend) -> Optional[torch.dtype]:
    """Mixed precision for the forward pass; adapters stay fp32 either way.

    "auto" follows the loaded weights (A1111 keeps the UNet in fp16 unless --no-half)."""
    base = backend.unet_dtype
    if precision == "auto":
        return None if base == torch.float32 else base
    if precision == "fp32":
        if base != torch.float32:
            raise ValueError("fp32 precision needs the model in fp32 (start A1111 with --no-half)")
        return None
    wanted = torch.float16 if precision == "fp16" else torch.bfloat16
    if wanted == torch.float16 and backend.device.type == "cpu":
        raise ValueError("fp16 precision needs a GPU; use bf16 or fp32 on CPU")
    return wanted


def _bitsandbytes_on_cuda(device: torch.device):
    if device.type != "cuda":
        return None
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes
