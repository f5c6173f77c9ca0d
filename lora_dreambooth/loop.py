"""The step loop of one run: optimizer, LR schedule, mixed precision, and each step's
micro-batches (latents → noise at random timesteps → prediction → ``objective``), with the
progress, preview, intermediate-save and stop callbacks the host turns into A1111's progress
bar and live preview.

One *step* is one optimizer update of ``batch_size × gradient_accumulation`` samples (the
lecture's definition), times the number of processes when data-parallel (``distributed``: the
one loop for the tab, a headless run and each process of ``accelerate launch``). A resumed run
counts its steps on from the file's, with the LR schedule, data order and noise of an
uninterrupted run (``TrainingLoop._replay``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from diffusers.optimization import get_scheduler
from PIL import Image

from . import export, resume, torch_compat
from .adapters import Adapters
from .config import TrainConfig, epoch_arithmetic
from .data import DreamBoothDataset, MicroBatch
from .distributed import SingleProcess
from .embedding import Pivot
from .model import Backend, Conditioning, cat_conditioning, detach_conditioning
from .objective import min_snr_weights, prior_preservation_loss
from .preview import render_preview
from .run_files import RunFiles


@dataclass
class Progress:
    step: int            # optimizer updates done (a resumed run counts on from the file's)
    total: int           # config.steps (plus the resumed file's steps)
    loss: float          # mean loss of the last step
    lr: float            # current UNet learning rate
    samples_per_s: float
    eta_s: float
    phase: str = "training"  # one of PHASES


#: What a run is doing, in order: the host checks the model and takes the snapshot
#: ("checking"), the engine reads the images, encodes latents and prompts, trains, saves, and
#: compares the model with the snapshot ("verifying").
PHASES = ("checking", "reading", "encoding", "training", "saving", "verifying")


@dataclass
class TrainCallbacks:
    on_progress: Optional[Callable[[Progress], None]] = None
    # Renders a preview at `step` with the adapter active, or returns None when it was cut
    # short (the run is stopping): nothing is saved then. None → the engine's own sampler.
    render_preview: Optional[Callable[[int], Optional[Image.Image]]] = None
    on_preview: Optional[Callable[[int, Image.Image, str], None]] = None  # (step, image, saved path)
    should_stop: Callable[[], bool] = field(default=lambda: False)  # checked every micro-batch
    on_log: Optional[Callable[[str], None]] = None


class Stopped(Exception):
    """should_stop() said yes in the middle of a step."""


def report(callbacks: TrainCallbacks, progress: Progress) -> None:
    if callbacks.on_progress:
        callbacks.on_progress(progress)


def save_adapters(adapters: Adapters, pivot: Optional[Pivot], config: TrainConfig, folder: str, backend: Backend,
          dataset: DreamBoothDataset, step: int, total: int, cover: Optional[Image.Image],
          name: Optional[str] = None, processes: int = 1) -> export.ExportResult:
    """The LoRA after ``step`` of ``total`` steps, resumed ones included (the file describes
    the whole training: ``ss_steps``, ``ss_max_train_steps``), trained by ``processes``
    data-parallel processes."""
    changes: dict = {"steps": total}
    if name is not None:
        changes.update(name=name, overwrite=True)
    return export.save_lora(adapters, dataclasses.replace(config, **changes), folder,
                            sd_version=backend.sd_version, steps_done=step,
                            num_train_images=dataset.num_instance_images, tag_frequency=dataset.tag_frequency,
                            cover_image=cover, embedding=pivot.tensors() if pivot is not None else None,
                            processes=processes)


class TrainingLoop:
    """Optimizer, schedules and the step loop for one run.

    Steps are counted from ``start`` (the resumed file's steps, else 0) to ``total``; the LR
    schedule runs over all of them, so a resumed run continues where the file's run was.
    ``parallel``: this process's part in a data-parallel run (default: the only process)."""

    def __init__(self, backend: Backend, adapters: Adapters, pivot: Optional[Pivot], dataset: DreamBoothDataset,
                 config: TrainConfig, callbacks: TrainCallbacks, run: RunFiles,
                 source: Optional[resume.ResumeSource] = None, parallel: Optional[SingleProcess] = None):
        self.backend, self.adapters, self.pivot, self.dataset = backend, adapters, pivot, dataset
        self.config, self.callbacks, self.run_files = config, callbacks, run
        self.parallel = parallel or SingleProcess()
        self.log = callbacks.on_log or (lambda message: None)
        self.start = source.steps if source is not None else 0
        self.total = self.start + config.steps
        self.generator = torch.Generator().manual_seed(config.seed)
        self.noise_scheduler = backend.training_scheduler()
        self.losses: list[float] = []
        self.last_loss = float("nan")
        self.autocast_dtype = autocast_dtype(config.precision, backend)
        self.optimizer = self._make_optimizer()
        self.scaler = loss_scaler(self.autocast_dtype, backend.device)
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
            bnb = bitsandbytes_on_cuda(self.backend.device)
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
        if cache is None:  # text encoder or embedding trains, or tags vary: encode every time
            cond = self.backend.encode_prompts(batch.prompts)
        else:
            cond = cat_conditioning([cache[p] for p in batch.prompts])
        return self.backend.conditioning(cond, batch)

    def _prompt_cache(self) -> Optional[dict[str, Conditioning]]:
        if self.config.train_text_encoder or self.pivot is not None:
            return None
        if self.dataset.prompts_vary:  # shuffled / dropped tags: a new prompt at every use
            self.log("caption tags change at every use: prompts are encoded at every step")
            return None
        with torch.no_grad(), self._autocast():
            return {p: detach_conditioning(self.backend.encode_prompts([p])) for p in self.dataset.prompts()}

    def _autocast(self):
        return torch_compat.autocast(self.backend.device.type, self.autocast_dtype)

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

    def _latent_shape(self, batch: MicroBatch) -> torch.Size:
        """The latents' shape, from the cached moments or the pixels' size (no VAE run)."""
        if batch.moments is not None:
            return torch.chunk(batch.moments, 2, dim=1)[0].shape
        return self.backend.latent_shape(batch.pixels.shape)

    def _loss(self, batch: MicroBatch, cond_cache: Optional[dict[str, Conditioning]]) -> torch.Tensor:
        """This process's loss on its share of ``batch``. The latents' sampling noise, the
        diffusion noise and the timesteps are drawn for the whole micro-batch in every process
        (the generator stays in step everywhere), and each process keeps its rows."""
        device = self.backend.device
        shape = self._latent_shape(batch)
        sampling = torch.randn(shape, generator=self.generator)
        noise, timesteps = self._noise(shape)
        batch, rows = batch.share(self.parallel.process_index, self.parallel.num_processes)
        latents = self.backend.latents_from_noise(self._moments(batch), sampling[rows]).float()
        noise, timesteps = noise[rows].to(device), timesteps[rows].to(device)
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
        processes = self.parallel.num_processes
        self.log(epoch_arithmetic(self.dataset.num_instance_images, config.batch_size, config.gradient_accumulation,
                                  config.steps, processes)
                 .describe(config.batch_size, config.gradient_accumulation, config.steps, processes))
        self._caching_progress(0, 0)  # latents (when cacheable) and prompts are encoded first
        if self.dataset.cacheable:
            self.dataset.cache_latents(self.backend.encode_moments, on_progress=self._caching_progress)
        cond_cache = self._prompt_cache()
        batches = self.dataset.micro_batches(config.batch_size * self.parallel.num_processes, self.generator)
        self._replay(batches, self.start)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.parallel.prepare(params)
        samples_per_step = config.batch_size * config.gradient_accumulation * self.parallel.num_processes
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
                    report(self.callbacks, Progress(step, self.total, loss, lr, rate, eta))
                    self._after_step(step)
            except Stopped:
                self.log(f"stopped after {step - 1} of {self.total} steps")
                return step - 1 - self.start, True
        return config.steps, False

    def _replay(self, batches: Iterator[MicroBatch], steps: int) -> None:
        """Bring the generator and the data stream to where they were after ``steps`` steps
        of the run being resumed, by drawing what each of its micro-batches drew (order,
        flips and augmentation in ``next``, then the latents' sampling noise as
        ``Backend.latents_from_moments`` draws it, then ``_noise``), with no model work: the
        latents' shape comes from the cached moments or the pixels' size, not from the VAE.
        With the same seed, data and batch settings the resumed run then sees exactly the
        samples, noise and timesteps of an uninterrupted one."""
        for _ in range(steps * self.config.gradient_accumulation):
            shape = self._latent_shape(next(batches))
            torch.randn(shape, generator=self.generator)
            self._noise(shape)

    def _step(self, batches: Iterator[MicroBatch], cond_cache, params: list[torch.nn.Parameter]) -> float:
        accumulation = self.config.gradient_accumulation
        total = torch.zeros(())
        for i in range(accumulation):
            if self.parallel.any(self.callbacks.should_stop()):  # every process stops at the same point
                self.optimizer.zero_grad(set_to_none=True)
                raise Stopped()
            batch = next(batches)
            with self.parallel.accumulating(last=i == accumulation - 1):  # gradients averaged after the last
                loss = self.parallel.forward(lambda: self._loss(batch, cond_cache)) / accumulation
                self.parallel.backward(self.scaler.scale(loss) if self.scaler else loss)
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
        return self.parallel.mean(total).item()

    def _after_step(self, step: int) -> None:
        """Previews and intermediate saves, by the main process only."""
        config = self.config
        if not self.parallel.is_main:
            return
        if config.preview_every and (step % config.preview_every == 0 or step == self.total):
            image = self._render_preview(step)
            if image is None:  # unfinished: neither a preview file nor the LoRA's cover
                self.log(f"preview at step {step} skipped (stopping)")
            else:
                path = self.run_files.add_preview(step, image)
                if self.callbacks.on_preview:
                    self.callbacks.on_preview(step, image, path)
        if config.save_every and step % config.save_every == 0 and step < self.total:
            saved = save_adapters(self.adapters, self.pivot, config, self.run_files.run_dir, self.backend, self.dataset,
                          step, self.total, self.run_files.last_preview, name=f"{config.output_name}-step{step:05d}",
                          processes=self.parallel.num_processes)
            self.save_state(saved.path, step)
            self.log(f"saved intermediate {saved.path}")

    def _render_preview(self, step: int) -> Optional[Image.Image]:
        if self.callbacks.render_preview:
            return self.callbacks.render_preview(step)
        config = self.config
        with self._autocast():
            return render_preview(self.backend, config.effective_preview_prompt,
                                  config.preview_negative_prompt, seed=config.preview_seed,
                                  steps=config.preview_steps, cfg_scale=config.preview_cfg,
                                  width=config.resolution, height=config.resolution)

    def _caching_progress(self, done: int, total: int) -> None:
        report(self.callbacks, Progress(self.start, self.total, float("nan"), 0.0, 0.0, 0.0, "encoding"))


def autocast_dtype(precision: str, backend: Backend) -> Optional[torch.dtype]:
    """Mixed precision for the forward pass; adapters stay fp32 either way.

    "auto" follows the loaded weights (A1111 keeps the UNet in fp16 unless --no-half)."""
    base, device = backend.unet_dtype, backend.device.type
    if precision == "fp32" or (precision == "auto" and base == torch.float32):
        if base != torch.float32:
            raise ValueError("fp32 precision needs the model in fp32 (start A1111 with --no-half)")
        return None
    wanted = base if precision == "auto" else torch.float16 if precision == "fp16" else torch.bfloat16
    if precision == "fp16" and device == "cpu":
        raise ValueError("fp16 precision needs a GPU; use bf16 or fp32 on CPU")
    if not torch_compat.autocast_supported(device, wanted):  # torch 2.1.2: fp16 weights on CPU
        raise ValueError(f"torch {torch.__version__} cannot autocast to {str(wanted)[6:]} on {device}: "
                         "start A1111 with --no-half, or set precision to bf16")
    return wanted


def loss_scaler(dtype: Optional[torch.dtype], device: torch.device) -> Optional[torch_compat.GradScaler]:
    """The loss scaler fp16 autocast on CUDA needs; None otherwise."""
    return torch_compat.cuda_grad_scaler() if dtype == torch.float16 and device.type == "cuda" else None


def bitsandbytes_on_cuda(device: torch.device):
    if device.type != "cuda":
        return None
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes
