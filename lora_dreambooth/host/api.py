"""/lora-train/v1/*: the same runner, job and tools as the tab, protected by --api-auth.

``POST /train`` takes TrainConfig's field names, plus ``instance_images`` (base64 images, or
``{"name", "data"}`` objects) instead of ``instance_dir``. Everything is checked before anything
is written or queued: 422 lists every problem; 202 gives the job id and its place in the queue
(0: it started at once). The job trains on a copy of its images taken now. ``resume_from`` is a
LoRA's name in the Lora folder or a path in it or under the output root; without
``resume_optimizer`` the state its run left is found (``job.prepare_resume``).

``GET /jobs`` lists every job (``runner.describe``); ``GET /status?job=ID`` one of them, without
``job`` the current run; ``POST /cancel`` with ``{"job": ID}`` takes a queued job off the queue
or stops the running one, without a body it stops the running one. ``POST /queue/start`` runs
the queue (after a restart it waits for this); ``POST /jobs/ID/resume`` queues an interrupted
job again from its last save; ``POST /jobs/ID/remove`` takes a finished job off the list;
``GET /jobs/ID/settings`` is its headless ``run.json`` and command line.

``GET /token?text=…`` is the trigger check (503 without a loaded model). ``POST /grid`` renders a
contamination grid under A1111's queue lock and answers when it is done (409 while training, or
when the user pressed Interrupt meanwhile).

``POST /promote`` copies an intermediate save of a run into the Lora folder (409 while training).
"""
from __future__ import annotations

import shutil
from secrets import compare_digest
from typing import Any, Callable, Optional

from fastapi import Body, Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import call_queue, shared

from ..config import ConfigError, TrainConfig
from ..export import png_base64
from ..grid import GridRequest
from . import a1111, contamination, files, token_check
from .job import JobStatus, prepare_resume, request_problems
from .runner import QueueRunner

PREFIX = "/lora-train/v1"
IMAGES_FIELD = "instance_images"
GRID_FIELDS = ("lora", "trigger", "class_word", "prompts", "seed", "weights", "negative_prompt", "steps",
               "cfg_scale", "resolution")
PROMOTE_FIELDS = ("file", "name", "overwrite")


def parse_credentials(api_auth: Optional[str]) -> dict[str, str]:
    """``--api-auth "user:pass,user2:pass2"`` as A1111's Api reads it."""
    credentials = {}
    for pair in (api_auth or "").split(","):
        if pair:
            user, password = pair.split(":", 1)
            credentials[user] = password
    return credentials


def basic_auth(credentials: dict[str, str]) -> Callable:
    """HTTP Basic like A1111's ``Api.auth``: 401 unless user and password match."""
    def auth(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        if given.username in credentials and compare_digest(given.password, credentials[given.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})
    return auth


def status_body(status: JobStatus) -> dict[str, Any]:
    preview = None if status.preview is None else png_base64(status.preview)
    return {"job": status.job, "state": status.state, "phase": status.phase, "text": status.text,
            "step": status.step, "total": status.total,
            "loss": status.loss, "eta_s": status.eta_s, "preview": preview, "output": status.output,
            "error": status.error}


def _busy() -> JSONResponse:
    return JSONResponse(status_code=409, content={"detail": ["a training run is already active"]})


def _no_job(job_id: str) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": [f"no job {job_id}"]})


def _job_id(payload: Optional[dict]) -> tuple[Optional[str], list[str]]:
    """The ``job`` of a cancel request (None: the running one) and the request's problems."""
    payload = payload or {}
    problems = [f"unknown field '{k}'" for k in payload if k != "job"]
    job_id = payload.get("job")
    if job_id is not None and not isinstance(job_id, str):
        problems.append("job must be a job id (a string)")
    return job_id, problems


def _prepare(payload: dict) -> tuple[Optional[TrainConfig], Optional[str], list[str], list[str]]:
    """(config, staged image folder, problems, images skipped as duplicates); on problems
    nothing is left on disk."""
    values = {**a1111.loaded_family()[1], **payload}  # unset fields: the loaded family's defaults
    images = values.pop(IMAGES_FIELD, None)
    problems: list[str] = []
    staging, skipped = None, []
    if images is not None:
        if values.get("instance_dir"):
            problems.append(f"give either {IMAGES_FIELD} or instance_dir, not both")
        staging, image_problems, skipped = files.stage_base64_images(images, IMAGES_FIELD)
        problems += image_problems
    config = None
    try:
        config = TrainConfig.from_dict(values)
    except ConfigError as error:
        problems += error.problems
    if config is not None:
        config.instance_dir = staging or config.instance_dir
        problems += prepare_resume(config)
        problems += request_problems(config, check_instance=images is None)
    if problems and staging:
        shutil.rmtree(staging, ignore_errors=True)
        staging = None
    return config, staging, problems, skipped


def grid_request(payload: dict) -> tuple[Optional[GridRequest], list[str]]:
    """A GridRequest from JSON: GRID_FIELDS only; render settings default to the lecture's
    preview settings (20 steps, CFG 5, the lecture's negative prompt, 512 px)."""
    unknown = [f"unknown field '{k}'" for k in payload if k not in GRID_FIELDS]
    if unknown:
        return None, unknown
    preview = TrainConfig()
    values = {"negative_prompt": preview.preview_negative_prompt, "steps": preview.preview_steps,
              "cfg_scale": preview.preview_cfg, "resolution": preview.resolution, "lora": "", "trigger": "",
              "class_word": "", **{k: v for k, v in payload.items() if v is not None}}
    request = GridRequest(**values)
    problems = contamination.request_problems(request)
    return (None, problems) if problems else (request, [])


def promote_problems(payload: dict) -> list[str]:
    """Type problems of a promote request (``file`` a string, ``name`` a string, ``overwrite``
    a boolean); what the file and the name may be is the job's to say."""
    problems = [f"unknown field '{k}'" for k in payload if k not in PROMOTE_FIELDS]
    if not isinstance(payload.get("file"), str) or not payload["file"].strip():
        problems.append("file must be an intermediate save's file name in the last run folder, or its path")
    if not isinstance(payload.get("name") or "", str):
        problems.append("name must be a string")
    if not isinstance(payload.get("overwrite") or False, bool):
        problems.append("overwrite must be true or false")
    return problems


def register(app: FastAPI, runner: QueueRunner, api_auth: Optional[str] = None) -> None:
    """on_app_started callback body."""
    dependencies = [Depends(basic_auth(parse_credentials(api_auth)))] if api_auth else []
    job = runner.job

    def train(payload: dict = Body(...)) -> JSONResponse:
        config, staging, problems, skipped = _prepare(payload)
        if problems:
            return JSONResponse(status_code=422, content={"detail": problems})
        try:
            record = runner.add(config, "api", staged_instance=staging)
        except OSError as error:  # the copy of the images could not be made (disk full, …)
            return JSONResponse(status_code=507, content={"detail": [f"the job's images could not be copied: {error}"]})
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)  # moved into the job's folder unless that failed
        described = runner.describe(record)
        return JSONResponse(status_code=202, content={
            "job": record.id, "position": described["position"], "state": described["state"],
            "text": described["text"], "skipped": skipped})

    def status(job_id: Optional[str] = Query(None, alias="job", description="a job id; none: the current run")):
        live = job.status()
        if job_id is None or job_id == live.job:
            return status_body(live)
        record = runner.queue.get(job_id)
        return _no_job(job_id) if record is None else runner.describe(record)

    def jobs() -> dict[str, Any]:
        return {"jobs": runner.jobs(), "paused": runner.queue.paused, "notice": runner.queue.notice}

    def cancel(payload: Optional[dict] = Body(None)) -> JSONResponse:
        job_id, problems = _job_id(payload)
        if problems:
            return JSONResponse(status_code=422, content={"detail": problems})
        if job_id is not None and runner.queue.get(job_id) is None and job.status().job != job_id:
            return _no_job(job_id)
        cancelled, message = runner.cancel(job_id)
        return JSONResponse(content={"cancelled": cancelled, "message": message, **status_body(job.status())})

    def start_queue() -> dict[str, Any]:
        runner.start()
        return jobs()

    def job_action(action: Callable[[str], tuple[bool, str]]) -> Callable:
        def route(job_id: str) -> JSONResponse:
            if runner.queue.get(job_id) is None:
                return _no_job(job_id)
            done, message = action(job_id)
            return JSONResponse(status_code=200 if done else 409, content={"done": done, "message": message})
        return route

    def job_settings(job_id: str) -> JSONResponse:
        found = runner.run_settings(job_id)
        return _no_job(job_id) if found is None else JSONResponse(content=found)

    def token(text: str = Query(..., description="the trigger word to check")) -> JSONResponse:
        report, problem = token_check.check(text)
        if report is None:
            return JSONResponse(status_code=503, content={"detail": [problem]})
        return JSONResponse(content={**report.to_dict(), "message": report.describe()})

    def grid(payload: dict = Body(...)) -> JSONResponse:
        if job.active:
            return _busy()
        request, problems = grid_request(payload)
        if problems:
            return JSONResponse(status_code=422, content={"detail": problems})
        with call_queue.queue_lock:  # after any txt2img in progress, like A1111's own API
            shared.state.begin(job="lora-train-grid")
            try:
                outcome = contamination.run(request, job.status())
            finally:
                shared.state.end()  # frees memory too
        if outcome.grid is None:
            return JSONResponse(status_code=409, content={"detail": [outcome.message]})
        return JSONResponse(content={
            "image": png_base64(outcome.grid.image), "path": outcome.path,
            "moved_at": request.strongest,
            "rows": [{"prompt": row.prompt, "moved": row.moved} for row in outcome.grid.rows]})

    def promote(payload: dict = Body(...)) -> JSONResponse:
        if job.active:
            return _busy()
        problems = promote_problems(payload)
        if problems:
            return JSONResponse(status_code=422, content={"detail": problems})
        try:
            result = job.promote(payload["file"], payload.get("name") or "", bool(payload.get("overwrite")))
        except ValueError as error:
            return JSONResponse(status_code=422, content={"detail": [str(error)]})
        return JSONResponse(content={"output": result.path, "name": result.name})

    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"], status_code=202, dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs", jobs, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/cancel", cancel, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/queue/start", start_queue, methods=["POST"], dependencies=dependencies)
    app.add_api_route(PREFIX + "/jobs/{job_id}/settings", job_settings, methods=["GET"], dependencies=dependencies)
    app.add_api_route(PREFIX + "/jobs/{job_id}/resume", job_action(runner.resume), methods=["POST"],
                      dependencies=dependencies)
    app.add_api_route(PREFIX + "/jobs/{job_id}/remove", job_action(runner.remove), methods=["POST"],
                      dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/token", token, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/grid", grid, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/promote", promote, methods=["POST"], dependencies=dependencies)
