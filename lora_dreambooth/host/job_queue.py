"""The run queue on disk: every job the tab and the API have queued or run, in order, in
``<output>/queue/queue.json`` (written atomically after each change), each with its own folder
``<output>/queue/<id>/`` holding the copy of its images taken when it was queued.

A job records its settings (``TrainConfig.to_dict()``, the headless ``run.json``) and the
checkpoint A1111 held when it was queued (``CheckpointInfo``'s title, short hash and file).
Reading the file after a restart marks a job that was running as *interrupted* (its run
folder, with its intermediate saves, is kept) and leaves queued jobs queued: the runner
starts them only when the user says so."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from modules import shared

from ..export import atomic_write
from . import paths
from .job import CANCELLED, DONE, FAILED, RUNNING

QUEUED, INTERRUPTED = "queued", "interrupted"
FINISHED = (DONE, CANCELLED, FAILED, INTERRUPTED)
FILE = "queue.json"
VERSION = 1


def loaded_checkpoint() -> Optional[dict[str, str]]:
    """The checkpoint A1111 holds now (``shared.sd_model.sd_checkpoint_info``): its title
    (``name [shorthash]``), short sha256 and file; None without a model."""
    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    if info is None:
        return None
    return {"title": str(getattr(info, "title", "") or getattr(info, "name", "")),
            "shorthash": str(getattr(info, "shorthash", "") or ""),
            "filename": str(getattr(info, "filename", "") or "")}


def same_checkpoint(wanted: Optional[dict], loaded: Optional[dict]) -> bool:
    """Whether ``loaded`` is the checkpoint ``wanted`` (by its sha256 when both know it, else
    by file). A job queued without a known checkpoint runs on any."""
    if not wanted:
        return True
    if not loaded:
        return False
    if wanted.get("shorthash") and loaded.get("shorthash"):
        return wanted["shorthash"] == loaded["shorthash"]
    return bool(wanted.get("filename")) and wanted.get("filename") == loaded.get("filename")


def checkpoint_title(checkpoint: Optional[dict]) -> str:
    return (checkpoint or {}).get("title") or (checkpoint or {}).get("filename") or "none"


def write_json(path: str, data: Any) -> None:
    """``data`` as indented JSON at ``path``, atomically."""
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
    atomic_write(path, write)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


@dataclass
class JobRecord:
    """One job of the queue, as written to ``queue.json``."""

    id: str
    config: dict[str, Any]              # TrainConfig.to_dict(), images pointing at the job's copy
    checkpoint: Optional[dict[str, str]]
    folder: str                         # <output>/queue/<id>: the job's own files
    state: str = QUEUED
    source: str = "api"                 # "api", "tab queue" or "tab start"
    created: str = field(default_factory=_now)
    finished: Optional[str] = None
    name: Optional[str] = None
    run_dir: Optional[str] = None
    output: Optional[str] = None
    error: Optional[str] = None
    text: str = ""
    step: int = 0
    total: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "JobRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class JobQueue:
    """The jobs in order (queued ones run first to last) and the file they live in. Every
    method takes the queue's lock; each change is written to disk before it returns."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, FILE)
        self.lock = threading.RLock()
        self.jobs: list[JobRecord] = []
        self.paused = False
        self.notice = ""  # what the user should know about the file (a damaged one set aside)
        self._load()

    def _load(self) -> None:
        """Read the file left by the last session: running jobs become interrupted; with any
        job still queued the queue is paused until *Start queue*."""
        if not os.path.isfile(self.path):
            return
        try:
            with open(self.path, encoding="utf8") as f:
                data = json.load(f)
            self.jobs = [JobRecord.from_dict(item) for item in data["jobs"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            aside = f"{self.path}.damaged-{datetime.datetime.now():%Y%m%d-%H%M%S}"
            os.replace(self.path, aside)
            self.notice = f"the queue file could not be read ({error}); it was kept as {aside}"
            return
        for job in self.jobs:
            if job.state == RUNNING:
                job.state, job.finished = INTERRUPTED, _now()
                saves = paths.intermediates(job.run_dir)
                job.text = ("A1111 stopped during this run: "
                            + (f"resume continues from {saves[-1]}" if saves else "no intermediate save: "
                               "resume starts it again"))
        self.paused = any(job.state == QUEUED for job in self.jobs)
        if self.jobs:
            self.save()

    def save(self) -> None:
        with self.lock:
            os.makedirs(self.folder, exist_ok=True)
            write_json(self.path, {"version": VERSION, "jobs": [dataclasses.asdict(j) for j in self.jobs]})

    def job_folder(self, job_id: str) -> str:
        return os.path.join(self.folder, job_id)

    def add(self, record: JobRecord) -> int:
        """Append ``record``; its place among the queued jobs (1: next)."""
        with self.lock:
            self.jobs.append(record)
            try:
                self.save()
            except BaseException:  # not written: not queued
                self.jobs.remove(record)
                raise
            return self.position(record.id)

    def get(self, job_id: str) -> Optional[JobRecord]:
        with self.lock:
            return next((job for job in self.jobs if job.id == job_id), None)

    def queued(self) -> list[JobRecord]:
        with self.lock:
            return [job for job in self.jobs if job.state == QUEUED]

    def position(self, job_id: str) -> int:
        """1-based place among the queued jobs; 0 when not queued."""
        ids = [job.id for job in self.queued()]
        return ids.index(job_id) + 1 if job_id in ids else 0

    def update(self, job_id: str, **values: Any) -> None:
        with self.lock:
            job = self.get(job_id)
            if job is not None:
                for key, value in values.items():
                    setattr(job, key, value)
                if values.get("state") in FINISHED:
                    job.finished = _now()
                self.save()

    def requeue(self, job_id: str) -> None:
        """Put a finished job back at the end of the queue."""
        with self.lock:
            job = self.get(job_id)
            self.jobs.remove(job)
            job.state, job.finished, job.error = QUEUED, None, None
            self.jobs.append(job)
            self.save()

    def remove(self, job_id: str) -> Optional[JobRecord]:
        """Take a job that is not running off the list and delete its folder (the copy of its
        images and its run.json; never its run folder or its LoRA)."""
        with self.lock:
            job = self.get(job_id)
            if job is None or job.state == RUNNING:
                return None
            self.jobs.remove(job)
            self.save()
        if paths.inside(job.folder, self.folder) and os.path.realpath(job.folder) != os.path.realpath(self.folder):
            shutil.rmtree(job.folder, ignore_errors=True)
        return job
