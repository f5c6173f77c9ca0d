"""/lora-train/v1/{train,status,cancel,token,grid,promote}: the same job and tools as the tab,
protected by --api-auth.

``POST /train`` takes TrainConfig's field names, plus ``instance_images`` (base64 images, or
``{"name", "data"}`` objects) instead of ``instance_dir``. Everything is checked before anything
is written or started: 422 lists every problem, 409 means a run is active, 202 gives the job id.
``resume_from`` is a LoRA's name in the Lora folder or a path in it or under the output root;
without ``resume_optimizer`` the state its run left is found (``job.prepare_resume``).

``GET /token?text=…`` is the trigger check (503 without a loaded model). ``POST /grid`` renders a
contamination grid under A1111's queue lock and answers when it is done (409 while training, or
when the user pressed Interrupt meanwhile).

``POST /promote`` copies an intermediate save of a run into the Lora folder (409 while training).
"""
from __future__ import annotations

import shutil
import uuid
from secrets import compare_digest
from typing import Any, Callable, Optional

from fastapi import Body, Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import call_queue, shared

from ..config import ConfigError, TrainConfig
from ..export import png_base64
from ..grid import GridRequest
from . import a1111, contamination, files, paths, token_check
from .job import JobStatus, RunRequest, TrainingJob, prepare_resume, request_problems

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


def register(app: FastAPI, job: TrainingJob, api_auth: Optional[str] = None) -> None:
    """on_app_started callback body."""
    dependencies = [Depends(basic_auth(parse_credentials(api_auth)))] if api_auth else []

    def train(payload: dict = Body(...)) -> JSONResponse:
        if job.active:
            return _busy()
        config, staging, problems, skipped = _prepare(payload)
        if problems:
            return JSONResponse(status_code=422, content={"detail": problems})
        job_id = uuid.uuid4().hex[:12]
        upload_dir = None
        if staging:
            upload_dir = config.instance_dir = files.move_folder(staging, paths.upload_dir_name(job_id))
        if not job.start_in_background(RunRequest(config, upload_dir=upload_dir), job_id):
            if upload_dir:
                shutil.rmtree(upload_dir, ignore_errors=True)
            return _busy()
        return JSONResponse(status_code=202, content={"job": job_id, "skipped": skipped})

    def status() -> dict[str, Any]:
        return status_body(job.status())

    def cancel() -> dict[str, Any]:
        cancelled = job.cancel()
        return {"cancelled": cancelled, **status_body(job.status())}

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
    app.add_api_route(f"{PREFIX}/cancel", cancel, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/token", token, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/grid", grid, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/promote", promote, methods=["POST"], dependencies=dependencies)
