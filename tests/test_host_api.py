"""/lora-train/v1/* through FastAPI's TestClient, registered the way A1111 does it
(on_app_started), training the tiny model for real."""
from __future__ import annotations

import base64
import io
import os
import tempfile
import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from a1111_stub.harness import (a1111, api_client, hook_progress, load_model_as_a1111,  # noqa: F401
                                load_script, png_bytes, wait_until_finished)

QUICK = {"trigger": "sks", "steps": 2, "rank": 4, "alpha": 4.0, "resolution": 64, "preview_every": 0,
         "preview_steps": 2, "learning_rate": 1e-3}


@pytest.fixture
def client(a1111):
    return api_client(a1111)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def tree(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_train_with_uploaded_images_reports_progress_and_the_output(a1111, client, tiny_sd1):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    assert client.get("/lora-train/v1/status").json()["state"] == "idle"
    images = [b64(png_bytes((200, 10, 10))), {"name": "../../etc/passwd me.png", "data": b64(png_bytes((0, 0, 0)))},
              {"name": "again.png", "data": b64(png_bytes((200, 10, 10)))}]
    response = client.post("/lora-train/v1/train", json={**QUICK, "preview_every": 2, "instance_images": images})
    assert response.status_code == 202
    assert response.json()["skipped"] == ["instance_images[2] (again.png): the same picture as instance_images[0]: "
                                          "not added twice"]
    job = response.json()["job"]
    status = wait_until_finished(client)
    assert status["job"] == job and status["state"] == "done", status
    assert (status["step"], status["total"], status["error"]) == (2, 2, None)
    assert status["output"] == os.path.join(a1111.lora_dir, "sks.safetensors") and os.path.isfile(status["output"])
    assert Image.open(io.BytesIO(base64.b64decode(status["preview"]))).size == (64, 64)
    copy = os.path.join(a1111.data_path, "outputs", "lora-train", "queue", job, "instance", "images")
    assert sorted(os.listdir(copy)) == ["image-001.png", "passwd_me.png"]  # the job's own copy
    assert client.get("/lora-train/v1/status").json()["state"] == "done"  # until the next run


def test_bad_requests_get_every_message_and_nothing_is_written(a1111, client, tiny_sd1, tmp_path, monkeypatch):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tempfile.tempdir)
    response = client.post("/lora-train/v1/train", json={
        **QUICK, "trigger": "a:b", "steps": 0, "name": "../x",
        "instance_images": ["%%% not base64", b64(b"just text"), {"name": "x.png", "data": 5}]})
    assert response.status_code == 422
    detail = response.json()["detail"]
    for expected in ("trigger must not contain", "steps must be between", "LoRA name must not contain",
                     "instance_images[0]: not valid base64", "instance_images[1]", "instance_images[2] (x.png)"):
        assert any(expected in message for message in detail), (expected, detail)
    assert tree(a1111.data_path) == [] and tree(tempfile.tempdir) == []
    assert client.post("/lora-train/v1/train", json={**QUICK, "instance_images": []}).status_code == 422
    unknown = client.post("/lora-train/v1/train", json={**QUICK, "instance_dir": "/nowhere", "colour": "red"})
    assert unknown.status_code == 422 and unknown.json()["detail"] == ["unknown setting 'colour'"]
    untyped = client.post("/lora-train/v1/train", json={**QUICK, "instance_dir": "/nowhere", "extra": {"a": 1}})
    assert untyped.status_code == 422 and untyped.json()["detail"] == ["unknown setting 'extra'"]
    folder = client.post("/lora-train/v1/train", json={**QUICK, "instance_dir": "/nowhere"})
    assert "instance (dataset) folder does not exist: /nowhere" in folder.json()["detail"][0]
    a1111.shared.sd_model = None
    images = {"instance_images": [b64(png_bytes((1, 2, 3)))]}
    no_model = client.post("/lora-train/v1/train", json={**QUICK, **images})
    assert no_model.status_code == 422 and "No Stable Diffusion model" in no_model.json()["detail"][0]
    assert tree(a1111.data_path) == [] and tree(tempfile.tempdir) == []


def test_a_second_run_is_queued_while_one_is_active_and_cancel_saves(a1111, client, tiny_sd1, monkeypatch):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    gate, at_step_1 = threading.Event(), threading.Event()

    def hold_at_step_1(progress):
        if progress.step == 1:
            at_step_1.set()
            gate.wait(30)

    hook_progress(monkeypatch, hold_at_step_1)
    payload = {**QUICK, "steps": 50, "instance_images": [b64(png_bytes((9, 9, 9)))]}
    assert client.post("/lora-train/v1/train", json=payload).status_code == 202
    assert at_step_1.wait(30)
    assert a1111.call_queue.queue_lock.locked()  # txt2img would wait for us
    assert a1111.state.job_no == 1 and a1111.state.job_count == 50 and "Step 1/50" in a1111.state.textinfo
    second = client.post("/lora-train/v1/train", json=payload)
    assert second.status_code == 202 and second.json()["position"] == 1 and second.json()["state"] == "queued"
    removed = client.post("/lora-train/v1/cancel", json={"job": second.json()["job"]}).json()
    assert removed["cancelled"] is True and removed["state"] == "running"  # the running one goes on
    cancelled = client.post("/lora-train/v1/cancel").json()
    assert cancelled["cancelled"] is True
    gate.set()
    status = wait_until_finished(client)
    assert status["state"] == "cancelled" and status["step"] == 1
    assert os.path.isfile(status["output"])
    deadline = time.time() + 10
    while a1111.call_queue.queue_lock.locked() and time.time() < deadline:
        time.sleep(0.01)  # the thread lets go of the lock right after publishing the end
    assert not a1111.call_queue.queue_lock.locked()
    assert client.post("/lora-train/v1/cancel").json()["cancelled"] is False


def test_api_auth_is_http_basic_like_a1111(a1111, tiny_sd1):
    a1111.shared.cmd_opts.api_auth = "alice:secret,bob:pw:with:colons"
    load_script()
    app = FastAPI()
    a1111.script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get("/lora-train/v1/status").status_code == 401
    assert client.get("/lora-train/v1/status", auth=("alice", "wrong")).status_code == 401
    assert client.post("/lora-train/v1/train", json=QUICK, auth=("eve", "secret")).status_code == 401
    assert client.post("/lora-train/v1/cancel").status_code == 401
    assert client.get("/lora-train/v1/status", auth=("alice", "secret")).json()["state"] == "idle"
    assert client.get("/lora-train/v1/status", auth=("bob", "pw:with:colons")).status_code == 200
