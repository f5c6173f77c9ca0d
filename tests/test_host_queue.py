"""The run queue through the API, training the tiny model for real: a second job waits its
turn (202 with its place), jobs are listed and reported one by one, a queued job is removed or
the running one stopped by id, each job trains on the copy of its images taken when queued and
on the checkpoint it was queued on, and the queue survives a restart without starting by itself."""
from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import sys
import time

import pytest
from safetensors import safe_open

from a1111_stub.harness import (Hold, a1111, api_client, load_model_as_a1111,  # noqa: F401
                                png_bytes, wait_until_finished, write_images)
from lora_dreambooth.config import TrainConfig

QUICK = {"trigger": "sks", "steps": 2, "rank": 4, "alpha": 4.0, "resolution": 64, "preview_every": 0,
         "learning_rate": 1e-3}
FINISHED = ("done", "cancelled", "failed", "interrupted")


def image() -> str:
    return base64.b64encode(png_bytes((9, 9, 9))).decode("ascii")


def metadata(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def jobs(client) -> dict[str, dict]:
    return {job["job"]: job for job in client.get("/lora-train/v1/jobs").json()["jobs"]}


def wait_for(client, job_ids, states=FINISHED, timeout: float = 120) -> dict[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        listed = jobs(client)
        if all(listed[j]["state"] in states for j in job_ids):
            return listed
        time.sleep(0.05)
    raise AssertionError(f"jobs did not reach {states}: {jobs(client)}")


def post(client, **values) -> dict:
    response = client.post("/lora-train/v1/train", json={**QUICK, **values})
    assert response.status_code == 202, response.json()
    return response.json()


@pytest.fixture
def client(a1111, tiny_sd1):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    return api_client(a1111)


def test_jobs_queue_behind_the_running_one_are_listed_and_run_one_at_a_time(a1111, client, monkeypatch):
    hold = Hold(monkeypatch)
    first = post(client, name="first", steps=3, instance_images=[image()])
    assert (first["position"], first["state"]) == (0, "running")
    assert hold.reached.wait(60)
    second = post(client, name="second", instance_images=[image()])
    third = post(client, name="third", instance_images=[image()])
    assert (second["position"], third["position"]) == (1, 2) and second["state"] == "queued"

    listed = jobs(client)
    assert [listed[j["job"]]["state"] for j in (first, second, third)] == ["running", "queued", "queued"]
    assert listed[third["job"]]["text"] == "queued, #2: waits for the run in progress"
    one = client.get("/lora-train/v1/status", params={"job": second["job"]}).json()
    assert (one["job"], one["state"], one["position"], one["output"], one["error"]) == \
        (second["job"], "queued", 1, None, None)
    current = client.get("/lora-train/v1/status").json()
    assert current["job"] == first["job"] and current["state"] == "running" and current["step"] == 1
    assert client.get("/lora-train/v1/status", params={"job": "nope"}).status_code == 404

    hold.release()
    listed = wait_for(client, [first["job"], second["job"], third["job"]])
    for job, name in ((first, "first"), (second, "second"), (third, "third")):
        record = listed[job["job"]]
        assert (record["state"], record["error"]) == ("done", None), record
        assert record["output"] == os.path.join(a1111.lora_dir, f"{name}.safetensors")
        assert os.path.isfile(record["output"])
    # one run at a time: each job's progress reports come in one block, in queue order
    blocks = [job for i, job in enumerate(hold.order) if i == 0 or hold.order[i - 1] != job]
    assert blocks == [first["job"], second["job"], third["job"]]


def test_cancel_by_id_removes_a_queued_job_or_stops_the_running_one(a1111, client, monkeypatch):
    hold = Hold(monkeypatch)
    running = post(client, steps=50, instance_images=[image()])
    assert hold.reached.wait(60)
    queued = post(client, name="later", instance_images=[image()])
    folder = os.path.join(a1111.data_path, "outputs", "lora-train", "queue", queued["job"])
    assert os.listdir(os.path.join(folder, "instance", "images"))

    removed = client.post("/lora-train/v1/cancel", json={"job": queued["job"]}).json()
    assert removed["cancelled"] is True and "removed from the queue" in removed["message"]
    assert queued["job"] not in jobs(client) and not os.path.exists(folder)
    assert client.post("/lora-train/v1/cancel", json={"job": "nope"}).status_code == 404
    assert client.post("/lora-train/v1/cancel", json={"job": 5}).status_code == 422

    stopped = client.post("/lora-train/v1/cancel", json={"job": running["job"]}).json()
    assert stopped["cancelled"] is True
    hold.release()
    record = wait_for(client, [running["job"]])[running["job"]]
    assert record["state"] == "cancelled" and record["step"] == 1 and os.path.isfile(record["output"])
    assert client.post("/lora-train/v1/cancel", json={"job": running["job"]}).json()["cancelled"] is False


def test_a_job_trains_on_the_copy_of_its_images_taken_when_queued(a1111, client, monkeypatch):
    hold = Hold(monkeypatch)
    post(client, name="busy", instance_images=[image()])
    assert hold.reached.wait(60)
    mine = os.path.join(a1111.data_path, "my-dataset")
    write_images(mine, 2)
    with open(os.path.join(mine, "img0.txt"), "w") as f:
        f.write("sks, red hat")
    queued = post(client, name="copied", instance_dir=mine)
    # the user edits the dataset while the job waits
    os.remove(os.path.join(mine, "img1.png"))
    with open(os.path.join(mine, "img0.txt"), "w") as f:
        f.write("sks, blue hat")
    write_images(mine, 3, prefix="new")

    hold.release()
    record = wait_for(client, [queued["job"]])[queued["job"]]
    assert record["state"] == "done", record
    trained = metadata(record["output"])
    assert trained["ss_num_train_images"] == "2"
    assert "red hat" in trained["ss_tag_frequency"] and "blue hat" not in trained["ss_tag_frequency"]
    assert sorted(os.listdir(mine)) == ["img0.png", "img0.txt", "new0.png", "new1.png", "new2.png"]  # theirs


def test_a_job_waits_for_its_checkpoint_instead_of_training_on_another(a1111, client, tiny_sd1, monkeypatch):
    from lora_dreambooth.host import runner

    monkeypatch.setattr(runner, "CHECKPOINT_POLL_S", 0.05)
    hold = Hold(monkeypatch)
    post(client, name="busy", instance_images=[image()])
    assert hold.reached.wait(60)
    on_a = post(client, name="on_a", instance_images=[image()])
    load_model_as_a1111(a1111.shared, tiny_sd1, model_hash="bbbbbbbbbb", checkpoint="other.safetensors")
    on_b = post(client, name="on_b", instance_images=[image()])
    hold.release()

    listed = wait_for(client, [on_b["job"]])
    assert listed[on_b["job"]]["state"] == "done"
    waiting = client.get("/lora-train/v1/status", params={"job": on_a["job"]}).json()
    assert waiting["state"] == "queued"
    assert waiting["text"].startswith("needs checkpoint tiny.safetensors [0123abcdef] "
                                      "(loaded: other.safetensors [bbbbbbbbbb])")
    time.sleep(0.3)  # several looks at the loaded checkpoint: still waiting, model not switched
    assert jobs(client)[on_a["job"]]["state"] == "queued"
    assert a1111.shared.sd_model.sd_checkpoint_info.title == "other.safetensors [bbbbbbbbbb]"

    load_model_as_a1111(a1111.shared, tiny_sd1)  # the user loads the job's checkpoint
    assert wait_for(client, [on_a["job"]])[on_a["job"]]["state"] == "done"


def test_settings_are_the_headless_run_json_and_command(a1111, client):
    from modules import paths_internal

    job = post(client, name="headless", seed=7, instance_images=[image()])
    wait_for(client, [job["job"]])
    response = client.get(f"/lora-train/v1/jobs/{job['job']}/settings").json()
    settings = response["settings"]
    config = TrainConfig.from_dict(settings)
    assert config.to_dict() == settings and (config.name, config.seed, config.steps) == ("headless", 7, 2)
    copy = os.path.join(a1111.data_path, "outputs", "lora-train", "queue", job["job"], "instance", "images")
    assert config.instance_dir == copy and os.listdir(copy)
    assert shlex.split(response["command"]) == [
        "python", "-m", "lora_dreambooth", "train", "--settings", "run.json", "--checkpoint",
        os.path.join(os.path.dirname(a1111.lora_dir), "Stable-diffusion", "tiny.safetensors"),
        "--out", os.path.join(a1111.data_path, "outputs", "lora-train"), "--webui", paths_internal.script_path]
    assert client.get("/lora-train/v1/jobs/nope/settings").status_code == 404


def recorded_state(queue_dir: str, job_id: str) -> str:
    with open(os.path.join(queue_dir, "queue.json"), encoding="utf8") as f:
        return next(job["state"] for job in json.load(f)["jobs"] if job["id"] == job_id)


def restart(a1111):
    """A1111 restarted: the extension imported afresh (a new runner reads the queue file) and
    registered again; a new API client on it."""
    for name in list(sys.modules):
        if name.startswith("lora_dreambooth.host") or name == "lora_train_script":
            del sys.modules[name]
    for callbacks in a1111.script_callbacks.callback_map.values():
        callbacks.clear()
    return api_client(a1111)


def test_after_a_restart_the_queue_waits_for_start_and_the_interrupted_run_resumes(a1111, client, monkeypatch):
    hold = Hold(monkeypatch, step=3)
    crashed = post(client, name="long", steps=6, save_every=1, instance_images=[image()])
    assert hold.reached.wait(60)
    waiting = post(client, name="next", instance_images=[image()])
    # What is on disk at this moment is what A1111 leaves when it dies now: keep a copy of it,
    # end this session's runs, and put that copy back.
    queue_dir = os.path.join(a1111.data_path, "outputs", "lora-train", "queue")
    run_dir = jobs(client)[crashed["job"]]["run_dir"]
    for folder in (queue_dir, run_dir):
        shutil.copytree(folder, folder + ".at-crash")
    client.post("/lora-train/v1/cancel", json={"job": waiting["job"]})
    client.post("/lora-train/v1/cancel")
    hold.release()
    deadline = time.time() + 60
    while recorded_state(queue_dir, crashed["job"]) != "cancelled" and time.time() < deadline:
        time.sleep(0.05)
    for folder in (queue_dir, run_dir):
        shutil.rmtree(folder)
        os.rename(folder + ".at-crash", folder)
    for name in os.listdir(a1111.lora_dir):
        os.remove(os.path.join(a1111.lora_dir, name))
    saves = sorted(n for n in os.listdir(run_dir) if "-step" in n)
    assert saves and recorded_state(queue_dir, crashed["job"]) == "running"

    client = restart(a1111)
    time.sleep(0.3)
    listed = client.get("/lora-train/v1/jobs").json()
    assert listed["paused"] is True
    before = {job["job"]: job for job in listed["jobs"]}
    assert before[crashed["job"]]["state"] == "interrupted" and saves[-1] in before[crashed["job"]]["text"]
    assert before[waiting["job"]]["state"] == "queued"
    assert "press Start queue" in before[waiting["job"]]["text"]
    assert client.get("/lora-train/v1/status").json()["state"] == "idle"  # nothing started by itself
    assert sorted(n for n in os.listdir(run_dir) if "-step" in n) == saves  # intermediate saves kept

    resumed = client.post(f"/lora-train/v1/jobs/{crashed['job']}/resume").json()
    assert resumed["done"] is True and saves[-1] in resumed["message"]
    assert client.get("/lora-train/v1/status").json()["state"] == "idle"  # still waits for Start queue
    started = client.post("/lora-train/v1/queue/start").json()
    assert started["paused"] is False
    after = wait_for(client, [waiting["job"], crashed["job"]])
    assert after[waiting["job"]]["state"] == "done" and after[crashed["job"]]["state"] == "done"
    last_steps = int(metadata(os.path.join(run_dir, saves[-1]))["ss_steps"])
    final = metadata(after[crashed["job"]]["output"])
    assert final["ss_steps"] == "6" and after[crashed["job"]]["step"] == 6 and last_steps < 6
    assert after[crashed["job"]]["total"] == 6
    # finished jobs leave the list (and their copy of the images) on request, the LoRA stays
    assert client.post(f"/lora-train/v1/jobs/{crashed['job']}/remove").json()["done"] is True
    assert crashed["job"] not in jobs(client) and os.path.isfile(after[crashed["job"]]["output"])


def test_the_queue_file_is_replaced_whole_or_not_at_all_and_a_damaged_one_is_kept(a1111, tmp_path, monkeypatch):
    from lora_dreambooth.host import job_queue

    queue = job_queue.JobQueue(str(tmp_path / "queue"))
    queue.add(job_queue.JobRecord(id="a", config=TrainConfig().to_dict(), checkpoint=None, folder=queue.job_folder("a")))
    before = open(queue.path, encoding="utf8").read()

    def fail_midway(data, f, **kwargs):
        f.write('{"version": 1, "jobs": [')
        raise OSError("disk full")

    monkeypatch.setattr(job_queue.json, "dump", fail_midway)
    with pytest.raises(OSError):
        queue.add(job_queue.JobRecord(id="b", config={}, checkpoint=None, folder=queue.job_folder("b")))
    monkeypatch.undo()
    assert [job.id for job in queue.jobs] == ["a"]
    assert open(queue.path, encoding="utf8").read() == before and os.listdir(queue.folder) == ["queue.json"]

    with open(queue.path, "w", encoding="utf8") as f:
        f.write("{not json")
    reread = job_queue.JobQueue(queue.folder)
    assert reread.jobs == [] and "could not be read" in reread.notice
    [kept] = [n for n in os.listdir(queue.folder) if n.startswith("queue.json.damaged-")]
    assert open(os.path.join(queue.folder, kept), encoding="utf8").read() == "{not json"
