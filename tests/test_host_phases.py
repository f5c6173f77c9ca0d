"""The status endpoint and the tab's progress text say which phase a run is in, so a user sees
why the first step has not come yet; and a run reads every weight once before and once after
(the host's snapshot is the engine's: nobody hashes the model again)."""
from __future__ import annotations

import base64

from a1111_stub.harness import (a1111, api_client, hook_progress, load_model_as_a1111,  # noqa: F401
                                png_bytes, wait_until_finished, write_images)
from lora_dreambooth import guard
from lora_dreambooth.config import TrainConfig

TEXT = {"checking": "Checking the model…", "reading": "Reading images…", "encoding": "Encoding images and prompts…",
        "training": "Step ", "saving": "Saving after ", "verifying": "Checking the model is unchanged…"}


def test_status_and_progress_text_name_each_phase_in_order(a1111, tiny_sd1, monkeypatch):
    load_model_as_a1111(a1111.shared, tiny_sd1)
    client = api_client(a1111)
    seen: list[tuple[str, str, str, int]] = []

    def look() -> None:
        body = client.get("/lora-train/v1/status").json()
        seen.append((body["phase"], body["text"], a1111.state.textinfo, body["step"]))

    # At start the host has checked the model and taken its snapshot.
    hook_progress(monkeypatch, lambda progress: look(), at_start=look)
    image = base64.b64encode(png_bytes((9, 9, 9))).decode("ascii")
    request = {"trigger": "sks", "steps": 2, "rank": 4, "resolution": 64, "preview_every": 0,
               "instance_images": [image]}
    assert client.post("/lora-train/v1/train", json=request).status_code == 202
    final = wait_until_finished(client)
    assert final["state"] == "done" and final["phase"] == "" and final["step"] == 2

    phases = [phase for phase, *_ in seen]
    assert list(dict.fromkeys(phases)) == ["checking", "reading", "encoding", "training", "saving", "verifying"]
    for phase, text, bar, _step in seen:
        assert text.startswith(TEXT[phase]) and bar == text, (phase, text, bar)
    assert seen[-1][3] == 2  # checking the model afterwards keeps the step count


def test_a_run_reads_every_weight_once_before_and_once_after(a1111, tiny_sd1, monkeypatch):
    from lora_dreambooth.host.job import RunRequest, TrainingJob

    model = load_model_as_a1111(a1111.shared, tiny_sd1)
    reads: dict[int, int] = {}
    real = guard._checksum

    def counted(tensor):
        reads[tensor.data_ptr()] = reads.get(tensor.data_ptr(), 0) + 1
        return real(tensor)

    monkeypatch.setattr(guard, "_checksum", counted)
    images = write_images(a1111.data_path + "/images", 2)
    config = TrainConfig(trigger="sks", instance_dir=a1111.data_path + "/images", steps=2, rank=4, resolution=64,
                         preview_every=0)
    job = TrainingJob()
    assert images and job.claim("j", config) and job.run(RunRequest(config)).state == "done"
    weights = {p.data_ptr() for p in model.parameters()}
    assert weights <= set(reads) and set(reads.values()) == {2}
    assert "model state after: unchanged" in job.status().log
