"""The one training job. The tab (inside A1111's ``wrap_gradio_gpu_call``) and the API (a
background thread that takes the same ``call_queue.queue_lock``) both run it, so training
never overlaps generation and there is never more than one run.

A run: check the model → undo A1111's merged LoRAs → snapshot the model (``guard``) →
``train_lora`` with callbacks that feed ``shared.state`` and this job's status, which checks the
model against that snapshot at its end (one read of every weight before, one after) → card
picture and Lora list refresh → free memory (``memory.release``). ``JobStatus.phase`` says
what the run is doing (``train.PHASES``). Cancel, A1111's Interrupt and Stop all end
training at the next micro-batch and save what was trained.

Resuming: the tab and the API name the LoRA to continue, and ``prepare_resume`` finds its file
and the optimizer state its run left; ``TrainingJob.promote`` copies a run's intermediate save
into the Lora folder (so it can be used, or resumed, like any LoRA)."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from PIL import Image
from modules import call_queue, shared

from .. import adapters, export, resume
from ..config import TrainConfig
from ..export import ExportResult, atomic_write
from ..guard import ModelSnapshot
from ..train import Progress, TrainCallbacks, TrainResult, train_lora
from . import a1111, files, headroom, paths, render, settings
from .progress import STEPLESS, ProgressBridge

IDLE, RUNNING, DONE, CANCELLED, FAILED = "idle", "running", "done", "cancelled", "failed"
MAX_LOG_LINES = 500


@dataclass
class JobStatus:
    state: str = IDLE
    phase: str = ""                  # while running: "queued" or one of train.PHASES
    job: Optional[str] = None
    step: int = 0
    total: int = 0
    loss: Optional[float] = None
    lr: Optional[float] = None
    eta_s: Optional[float] = None
    text: str = ""
    trigger: str = ""
    name: Optional[str] = None       # the LoRA's final name (name, name-1, …)
    output: Optional[str] = None     # the .safetensors written
    run_dir: Optional[str] = None    # previews, loss.csv, config.json, intermediate saves (and grids)
    error: Optional[str] = None
    preview: Optional[Image.Image] = None
    previews: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def lora_prompt(self) -> str:
        """What "Send to txt2img" puts in the prompt."""
        return f"{self.trigger}, <lora:{self.name}:1>" if self.name else ""


@dataclass
class RunRequest:
    config: TrainConfig
    upload_dir: Optional[str] = None                  # API images, removed after the run
    workspace: Optional[paths.Workspace] = None       # the tab's images, cleared after the run
    # (both only when the "keep datasets" setting is off)
    run_dir: Optional[str] = None                     # the run folder (None: a new one is named)


def request_problems(config: TrainConfig, check_instance: bool = True) -> list[str]:
    """Everything wrong with training ``config`` on the loaded model now, in words
    (``check_instance=False`` when the caller has checked the instance images itself)."""
    problems = config.problems()
    if check_instance:
        problems += files.folder_problems(config.instance_dir, "instance (dataset)")
    if config.regularization > 0:
        problems += files.folder_problems(config.class_dir, "class")
    problems += a1111.model_problems(shared.sd_model)
    if not problems:  # a valid config on a trainable model: can its network type train it all?
        problem = adapters.network_problem(shared.sd_model, config)
        problems += [problem] if problem else []
    return problems


def _readable_file(value: str, label: str) -> tuple[str, str]:
    """(absolute path, problem) of a file a request names: only files in the Lora folder or
    under the output root are read, so the API cannot probe the rest of the disk."""
    path = os.path.abspath(os.path.expanduser(value))
    lora, root = paths.lora_dir(), paths.output_root()
    if not (paths.inside(path, lora) or paths.inside(path, root)):
        return path, f"{label} must be in the Lora folder ({lora}) or under the run output folder ({root})"
    if not os.path.isfile(path):
        return path, f"{label}: no such file: {value}"
    return path, ""


def _resume_file(value: str) -> tuple[str, str]:
    """(path, problem) of ``resume_from``: a LoRA's name in the Lora folder (as in
    ``<lora:name:w>``; subfolders are searched like A1111 does), or a path."""
    if os.path.basename(value) != value:
        return _readable_file(value, "resume from")
    name = value[:-len(".safetensors")] if value.lower().endswith(".safetensors") else value
    path = paths.lora_files().get(name)
    return (path, "") if path else ("", f"resume from: no LoRA named '{name}' in {paths.lora_dir()}")


def prepare_resume(config: TrainConfig) -> list[str]:
    """Point ``config.resume_from`` at its file and ``resume_optimizer`` at the optimizer state
    to load: the one given (it must belong to that file), else the one its run left in a run
    folder (``resume.find_state``), else none (the optimizer starts afresh). Returns the
    problems; with any, both fields are cleared so the config's own checks do not repeat them."""
    value = config.resume_from.strip()
    if not value:
        return []
    path, problem = _resume_file(value)
    state = config.resume_optimizer.strip()
    if not problem:
        try:
            source = resume.read_lora(path)
        except resume.ResumeError as error:
            problem = str(error)
    if not problem and state:
        state, problem = _readable_file(state, "resume optimizer")
        if not problem and resume.lora_hash_of_state(state) != source.hash:
            problem = (f"resume optimizer: {state} is not the optimizer state of {os.path.basename(path)} "
                       "(leave it out to have the right one found)")
    elif not problem:
        state = resume.find_state(path, paths.output_root()) or ""
    if problem:
        config.resume_from = config.resume_optimizer = ""
        return [problem]
    config.resume_from, config.resume_optimizer = path, state
    return []


def _chain(error: Optional[BaseException]) -> Iterator[BaseException]:
    """``error`` and what caused it (the engine wraps failures in ``TrainingError``)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _is_out_of_memory(error: BaseException) -> bool:
    return any(isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
               for e in _chain(error))


class _Previews:
    """Renders previews with A1111's sampler while the adapter is active."""

    def __init__(self, config: TrainConfig, bridge: ProgressBridge, should_stop):
        self.config, self.bridge, self.should_stop = config, bridge, should_stop
        self.last: Optional[Image.Image] = None

    def render(self, step: int) -> Optional[Image.Image]:
        """The preview, or None when A1111's Interrupt/Stop or Cancel cut it short (the engine
        then saves nothing for this step; the run stops right after)."""
        c = self.config
        image = None
        if not self.should_stop():
            self.bridge.begin_preview(step)
            image = render.txt2img(c.effective_preview_prompt, c.preview_negative_prompt,
                                   seed=c.preview_seed, steps=c.preview_steps, cfg_scale=c.preview_cfg,
                                   width=c.resolution, height=c.resolution)
        self.bridge.end_preview()
        if image is not None:
            self.last = image
        return image


class TrainingJob:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._cancel = threading.Event()
        self._outcome: tuple[str, Optional[str], Optional[str]] = (IDLE, None, None)  # (state, error, text)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> JobStatus:
        """A copy, safe to read while the run goes on."""
        with self._lock:
            s = self._status
            return dataclasses.replace(s, previews=list(s.previews), losses=list(s.losses), log=list(s.log))

    @property
    def active(self) -> bool:
        with self._lock:
            return self._status.state == RUNNING

    def claim(self, job_id: str, config: TrainConfig) -> bool:
        """Mark a run as started (False: one is active); its status replaces the last run's."""
        with self._lock:
            if self._status.state == RUNNING:
                return False
            self._status = JobStatus(state=RUNNING, phase="queued", job=job_id, total=config.steps,
                                     trigger=config.trigger.strip(), text="Waiting for the GPU queue…")
            self._cancel.clear()
            return True

    def abandon(self, error: str) -> None:
        """End a claimed run that could not be started (its job could not be recorded)."""
        with self._lock:
            s = self._status
            s.state, s.phase, s.error, s.text = FAILED, "", error, error

    def cancel(self) -> bool:
        """Stop the active run at its next micro-batch and save what was trained."""
        if not self.active:
            return False
        self._cancel.set()
        self._log("cancel requested: stopping and saving what was trained")
        return True

    def reset(self) -> bool:
        """Forget the last run's status and log (not while one runs)."""
        with self._lock:
            if self._status.state == RUNNING:
                return False
            self._status = JobStatus()
            return True

    def promote(self, file: str, name: str = "", overwrite: bool = False) -> ExportResult:
        """Copy an intermediate save (a file name in the last run's folder, or a path under the
        output root) into the Lora folder as ``name`` (empty: its own), then rescan A1111's Lora
        list so ``<lora:name:w>`` resolves. Raises ValueError saying what is wrong. Callers
        refuse while a run is active: its folder is still being written."""
        with self._lock:
            run_dir = self._status.run_dir
        path = paths.intermediate_path(file, run_dir)
        result = export.promote(path, paths.lora_dir(), overwrite=overwrite, name=(name or "").strip())
        a1111.refresh_lora_list()
        return result

    def _log(self, message: str) -> None:
        print(f"[lora-train] {message}")
        with self._lock:
            self._status.log.append(message)
            del self._status.log[:-MAX_LOG_LINES]

    # --- running --------------------------------------------------------------------------

    def run_queued(self, request: RunRequest, job_id: str) -> JobStatus:
        """Run a claimed job outside the tab: wait for A1111's queue lock, as
        ``wrap_gradio_gpu_call`` does for the tab (the runner's thread calls this)."""
        with call_queue.queue_lock:
            shared.state.begin(job=f"lora-train-{job_id}")
            try:
                return self.run(request)
            finally:
                shared.state.end()

    def run(self, request: RunRequest) -> JobStatus:
        """Run a claimed job; the caller holds ``call_queue.queue_lock``. The final state is
        published last, once the model is checked, memory freed and files tidied."""
        config = request.config
        bridge = ProgressBridge(config.steps, config.preview_every)
        bridge.start()
        with self._lock:
            self._status.phase, self._status.text = bridge.phase, bridge.text
        self._outcome = (FAILED, "the run ended without a result", None)
        try:
            model = shared.sd_model
            problems = a1111.model_problems(model)
            if problems:
                self._finish(FAILED, error=" ".join(problems))
            elif self._should_stop():
                self._finish(CANCELLED, text="Cancelled before training started: nothing saved")
            else:
                self._train(model, request, bridge)
        except Exception as error:  # a host bug must still end the run as failed
            self._finish(FAILED, error=f"{type(error).__name__}: {error}")
        finally:
            a1111.release_memory()
            self._cleanup(request)
            self._publish()
        return self.status()

    def _should_stop(self) -> bool:
        state = shared.state
        return self._cancel.is_set() or bool(state.interrupted) or bool(state.stopping_generation)

    def _train(self, model: torch.nn.Module, request: RunRequest, bridge: ProgressBridge) -> None:
        config = request.config
        restored = a1111.deactivate_networks(model)
        if restored:
            self._log(f"deactivated A1111's LoRAs: restored base weights of {restored} layers")
        snapshot = ModelSnapshot.take(model)
        self._log(f"model state before training: {snapshot.hash}")
        previews = _Previews(config, bridge, self._should_stop)
        callbacks = TrainCallbacks(
            on_progress=lambda p: self._on_progress(p, bridge),
            render_preview=previews.render,
            on_preview=lambda step, image, path: self._on_preview(image, path, bridge),
            should_stop=self._should_stop,
            on_log=self._log)
        run_dir = request.run_dir or paths.new_run_dir(config)
        with self._lock:  # known from the start: a failed run's intermediate saves can be promoted
            self._status.run_dir = run_dir
        try:
            result = train_lora(model, config, paths.lora_dir(), run_dir, callbacks, snapshot=snapshot)
        except Exception as error:
            self._on_failure(error, run_dir)
        else:
            self._on_result(result, previews.last)
            tight = headroom.warning(model) if result.path else ""
            if tight:
                self._log(tight)
        finally:  # the engine's check, or (it stopped before touching the model) our own
            found = snapshot.verified if snapshot.verified is not None else snapshot.verify(model)
            self._log("model state after: " + ("unchanged" if not found else
                                               "CHANGED: reload the checkpoint: " + "; ".join(found[:5])))
            if found:
                state, _error, text = self._outcome
                self._outcome = (state, "The model's weights changed during training: reload the checkpoint.", text)

    def _on_progress(self, progress: Progress, bridge: ProgressBridge) -> None:
        bridge.update(progress)
        loss = None if math.isnan(progress.loss) else progress.loss
        with self._lock:
            s = self._status
            s.phase, s.text = progress.phase, bridge.text
            if progress.phase in STEPLESS:
                return
            s.step, s.total, s.loss, s.lr, s.eta_s = progress.step, progress.total, loss, progress.lr, progress.eta_s
            if progress.phase == "training" and loss is not None:
                s.losses.append((progress.step, loss))

    def _on_preview(self, image: Image.Image, path: str, bridge: ProgressBridge) -> None:
        bridge.show(image)
        with self._lock:
            self._status.preview = image
            self._status.previews.append(path)

    def _on_result(self, result: TrainResult, cover: Optional[Image.Image]) -> None:
        if result.path:
            card = os.path.join(os.path.dirname(result.path), f"{result.name}.png")
            if cover is not None:
                atomic_write(card, lambda tmp: cover.save(tmp, format="PNG"))
            elif os.path.exists(card):  # overwritten LoRA, no preview this time: no stale card
                os.remove(card)
            if a1111.refresh_lora_list():
                self._log(f"Lora list refreshed: <lora:{result.name}:1> is ready")
        with self._lock:
            self._status.name, self._status.output, self._status.run_dir = result.name, result.path, result.run_dir
        steps = f"{result.steps_done} steps"
        if result.resumed_steps:
            steps += f" ({result.resumed_steps + result.steps_done} in all, resumed from {result.resumed_steps})"
        if result.cancelled:
            done = f"saved {result.path}" if result.path else "nothing saved"
            self._finish(CANCELLED, text=f"Cancelled after {steps}: {done}")
        else:
            self._finish(DONE, text=f"Finished {steps}: saved {result.path}")

    def _on_failure(self, error: Exception, run_dir: str) -> None:
        if _is_out_of_memory(error):
            message = ("Out of GPU memory: lower the batch size or resolution, or turn on gradient "
                       "checkpointing (Advanced). The model was restored and nothing was saved.")
        else:
            message = f"{error} (the model was restored and nothing was saved)"
        if any(isinstance(e, resume.ResumeError) for e in _chain(error)):
            # Refused before step 1: the run folder holds only config.json and an empty loss.csv.
            shutil.rmtree(run_dir, ignore_errors=True)
            with self._lock:
                self._status.run_dir = None
        self._finish(FAILED, error=message)

    def _finish(self, state: str, *, error: Optional[str] = None, text: Optional[str] = None) -> None:
        if error:
            self._log(f"failed: {error}")
        self._outcome = (state, error, text)

    def _publish(self) -> None:
        state, error, text = self._outcome
        with self._lock:
            s = self._status
            s.state, s.error, s.phase = state, error, ""
            s.eta_s = None if state == FAILED else 0.0
            s.text = text or error or s.text

    def _cleanup(self, request: RunRequest) -> None:
        if settings.get(settings.KEEP_DATASETS):
            return
        if request.upload_dir:
            shutil.rmtree(request.upload_dir, ignore_errors=True)
        if request.workspace:
            files.clear_folder(request.workspace.instance_dir)
            files.clear_folder(request.workspace.class_dir)
