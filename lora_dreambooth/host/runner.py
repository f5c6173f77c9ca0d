"""The one job runner the tab and the API share: it takes jobs off the queue (``job_queue``)
one at a time and runs each with ``TrainingJob`` under A1111's ``call_queue.queue_lock``.

A job is *dispatched* (claimed, then run in a thread that waits for the lock) when nothing is
running, the queue is not paused, and A1111 holds the checkpoint the job was queued on; jobs
queued on another checkpoint wait ("needs checkpoint X") while later ones run, and are looked
at again every few seconds. The tab's *Start* runs its job at once instead, inside
``wrap_gradio_gpu_call``, and is recorded in the same list. Nothing is dispatched at import:
after a restart the queue stays paused until ``start()`` (*Start queue*)."""
from __future__ import annotations

import os
import shlex
import shutil
import threading
import uuid
from typing import Any, Optional

from modules import paths_internal

from .. import resume
from ..config import ConfigError, TrainConfig
from ..data import scan_folder
from ..data.captions import CAPTION_EXTENSION
from . import files, paths
from .job import CANCELLED, FAILED, RUNNING, JobStatus, RunRequest, TrainingJob
from .job_queue import (INTERRUPTED, QUEUED, JobQueue, JobRecord, checkpoint_title, loaded_checkpoint,
                        same_checkpoint, write_json)

#: Seconds between looks at the loaded checkpoint while jobs wait for theirs.
CHECKPOINT_POLL_S = 2.0
RUN_JSON = "run.json"


def _copy_images(source: str, target: str) -> None:
    """The images of ``source`` and their caption files (what training reads), copied."""
    os.makedirs(target, exist_ok=True)
    images = {os.path.basename(path) for path in scan_folder(source)[0]}
    stems = {os.path.splitext(name)[0] for name in images}
    for name in sorted(os.listdir(source)):
        stem, ext = os.path.splitext(name)
        if name in images or (ext.lower() == CAPTION_EXTENSION and stem in stems):
            shutil.copyfile(os.path.join(source, name), os.path.join(target, name))


class QueueRunner:
    def __init__(self, job: TrainingJob):
        self.job = job
        self._queue: Optional[JobQueue] = None
        self._lock = threading.RLock()
        self._timer: Optional[threading.Timer] = None

    @property
    def queue(self) -> JobQueue:
        """Read from disk at first use (the output folder setting is known by then). Once read,
        no lock is taken: callers may hold the queue's lock (the order is runner, then queue)."""
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    self._queue = JobQueue(os.path.join(paths.output_root(), "queue"))
        return self._queue

    # --- adding jobs ------------------------------------------------------------------------

    def _new_record(self, config: TrainConfig, source: str) -> JobRecord:
        job_id = uuid.uuid4().hex[:12]
        return JobRecord(id=job_id, config=config.to_dict(), checkpoint=loaded_checkpoint(),
                         folder=self.queue.job_folder(job_id), source=source)

    def add(self, config: TrainConfig, source: str, staged_instance: Optional[str] = None) -> JobRecord:
        """Queue ``config`` (checked by the caller) with a copy of its images: the instance
        folder (or ``staged_instance``, moved in) and, with regularization, the class folder.
        Starts it when nothing runs."""
        record = self._new_record(config, source)
        try:
            if staged_instance:
                config.instance_dir = files.move_folder(staged_instance, os.path.join(record.folder, "instance", "images"))
            else:
                config.instance_dir = self._copy(config.instance_dir, record.folder, "instance")
            if config.regularization > 0:
                config.class_dir = self._copy(config.class_dir, record.folder, "class")
        except BaseException:
            shutil.rmtree(record.folder, ignore_errors=True)
            raise
        record.config = config.to_dict()
        self.queue.add(record)
        self.dispatch()
        return record

    @staticmethod
    def _copy(source: str, folder: str, kind: str) -> str:
        target = os.path.join(folder, kind, os.path.basename(os.path.normpath(source)) or kind)
        _copy_images(source, target)
        return target

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """*Start queue*: run the queued jobs from the first."""
        self.queue.paused = False
        self.dispatch()

    def dispatch(self) -> Optional[JobRecord]:
        """Start the first queued job that can run now, if nothing runs; the job started."""
        with self._lock:
            queue = self.queue
            if queue.paused or self.job.active:
                return None
            loaded = loaded_checkpoint()
            waiting = False
            for record in queue.queued():
                if not same_checkpoint(record.checkpoint, loaded):
                    waiting = True
                    continue
                try:
                    config = TrainConfig.from_dict(record.config)
                except ConfigError as error:  # queue.json edited by hand
                    queue.update(record.id, state=FAILED, error="; ".join(error.problems))
                    continue
                if not self.job.claim(record.id, config):
                    return None
                try:
                    queue.update(record.id, state=RUNNING, run_dir=paths.new_run_dir(config), text="")
                except OSError as error:
                    self.job.abandon(f"the queue file could not be written: {error}")
                    return None
                request = RunRequest(config, upload_dir=record.folder, run_dir=record.run_dir)
                threading.Thread(target=self._run, args=(record.id, request), daemon=True,
                                 name=f"lora-train-{record.id}").start()
                return record
            if waiting:
                self._look_again()
            return None

    def _look_again(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(CHECKPOINT_POLL_S, self._on_timer)
            self._timer.daemon = True
            self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
        self.dispatch()

    def _run(self, job_id: str, request: RunRequest) -> None:
        status = None
        try:
            status = self.job.run_queued(request, job_id)
        finally:
            self._record_end(job_id, status or self.job.status())
            self.dispatch()

    def run_now(self, config: TrainConfig, workspace: paths.Workspace) -> Optional[JobStatus]:
        """The tab's *Start*, inside ``wrap_gradio_gpu_call``: run ``config`` on the tab's
        images now, recorded in the list; None when a run is active."""
        record = self._new_record(config, "tab start")
        if not self.job.claim(record.id, config):
            return None
        record.state, record.run_dir = RUNNING, paths.new_run_dir(config)
        try:
            self.queue.add(record)
        except OSError as error:
            self.job.abandon(f"the queue file could not be written: {error}")
            return self.job.status()
        status = None
        try:
            status = self.job.run(RunRequest(config, workspace=workspace, run_dir=record.run_dir))
        finally:
            self._record_end(record.id, status or self.job.status())
        self.dispatch()
        return status

    def _record_end(self, job_id: str, status: JobStatus) -> None:
        state = status.state if status.state != RUNNING else INTERRUPTED
        self.queue.update(job_id, state=state, name=status.name, output=status.output, error=status.error,
                          text=status.text, step=status.step, total=status.total, run_dir=status.run_dir)

    # --- cancel, remove, resume ---------------------------------------------------------------

    def cancel(self, job_id: Optional[str] = None) -> tuple[bool, str]:
        """Stop the running job (``job_id`` None or its id) or take a queued one off the list;
        (done, what happened)."""
        current = self.job.status()
        if job_id is None or (current.state == RUNNING and current.job == job_id):
            if self.job.cancel():
                return True, "stopping after this step; what was trained is saved"
            return False, "no training is running"
        record = self.queue.get(job_id)
        if record is None:
            return False, f"no job {job_id}"
        if record.state != QUEUED:
            return False, f"job {job_id} is {record.state}, not queued or running"
        self.queue.remove(job_id)
        return True, f"job {job_id} removed from the queue"

    def remove(self, job_id: str) -> tuple[bool, str]:
        """Take a job that is not running off the list (its copy of the images goes with it;
        its run folder and LoRA stay)."""
        if self.queue.remove(job_id) is None:
            record = self.queue.get(job_id)
            return False, f"job {job_id} is running: cancel it first" if record else f"no job {job_id}"
        return True, f"job {job_id} removed"

    def resume(self, job_id: str) -> tuple[bool, str]:
        """Queue an interrupted, cancelled or failed job again, continuing from what it saved
        last (a cancelled run's LoRA, else its run's last intermediate save), else from the
        start, on its copy of the images."""
        record = self.queue.get(job_id)
        if record is None or record.state not in (INTERRUPTED, CANCELLED, FAILED):
            return False, f"job {job_id} is not interrupted, cancelled or failed" if record else f"no job {job_id}"
        config = dict(record.config)
        if files.folder_problems(config["instance_dir"], "instance (dataset)"):
            return False, f"job {job_id}'s images are gone ({config['instance_dir']}): queue it again from the tab"
        saves = [os.path.join(record.run_dir, name) for name in paths.intermediates(record.run_dir)]
        last = record.output if record.state == CANCELLED and record.output else (saves[-1] if saves else "")
        if last and os.path.isfile(last):
            target = config["steps"] + (resume.read_lora(config["resume_from"]).steps if config["resume_from"] else 0)
            steps = resume.read_lora(last).steps
            if steps >= target:
                return False, f"job {job_id} has all its {target} steps in {last}: nothing to resume"
            config.update(resume_from=last, resume_optimizer="", steps=target - steps)
            text = f"resumes from {os.path.basename(last)} (step {steps} of {target})"
        else:
            text = "nothing was saved: starts again"
        self.queue.update(job_id, config=config, text=text, run_dir=None, output=None, step=0, total=0)
        self.queue.requeue(job_id)
        self.dispatch()
        return True, text

    # --- reading ------------------------------------------------------------------------------

    def describe(self, record: JobRecord) -> dict[str, Any]:
        """What the API and the tab show of a job: the live status for the running one."""
        body = {"job": record.id, "state": record.state, "phase": "", "text": record.text, "step": record.step,
                "total": record.total, "output": record.output, "error": record.error,
                "name": record.name or (record.config.get("name") or record.config.get("trigger") or "").strip(),
                "checkpoint": checkpoint_title(record.checkpoint), "source": record.source,
                "created": record.created, "finished": record.finished, "run_dir": record.run_dir,
                "position": self.queue.position(record.id)}
        live = self.job.status()
        if live.job == record.id:
            body.update(state=live.state, phase=live.phase, text=live.text, step=live.step, total=live.total,
                        output=live.output, error=live.error, name=live.name, run_dir=live.run_dir)
        elif record.state == QUEUED:
            body["text"] = self.waiting_reason(record) or record.text
        return body

    def waiting_reason(self, record: JobRecord) -> str:
        """Why a queued job does not run now, in words."""
        loaded = loaded_checkpoint()
        if not same_checkpoint(record.checkpoint, loaded):
            return (f"needs checkpoint {checkpoint_title(record.checkpoint)} (loaded: {checkpoint_title(loaded)}): "
                    "load it to train this job")
        if self.queue.paused:
            return "the queue waits since A1111 restarted: press Start queue"
        if self.job.active:
            return f"queued, #{self.queue.position(record.id)}: waits for the run in progress"
        return "queued"

    def jobs(self) -> list[dict[str, Any]]:
        with self.queue.lock:
            return [self.describe(record) for record in self.queue.jobs]

    def run_settings(self, job_id: str) -> Optional[dict[str, Any]]:
        """The job's ``run.json`` (``TrainConfig.to_dict()``, images at the job's copy) and the
        headless command that trains it; None for an unknown job. ``--out`` is the run output
        folder, where the tab's run folders are: the command writes its run folder (intermediate
        saves, ``optimizer.safetensors``) beside the LoRA, and in the Lora folder A1111 would
        list those as LoRAs."""
        record = self.queue.get(job_id)
        if record is None:
            return None
        checkpoint = (record.checkpoint or {}).get("filename") or "MODEL.safetensors"
        command = ["python", "-m", "lora_dreambooth", "train", "--settings", RUN_JSON, "--checkpoint", checkpoint,
                   "--out", paths.output_root(), "--webui", paths_internal.script_path]
        return {"settings": dict(record.config), "command": shlex.join(command)}

    def write_run_json(self, job_id: str) -> Optional[tuple[str, str]]:
        """Write the job's ``run.json`` into its folder; (path, command naming that path)."""
        found = self.run_settings(job_id)
        if found is None:
            return None
        path = os.path.join(self.queue.job_folder(job_id), RUN_JSON)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, found["settings"])
        return path, found["command"].replace(f"--settings {RUN_JSON}", f"--settings {shlex.quote(path)}", 1)
