"""The host's small pieces against the stand-in: merged-LoRA restore, progress text, file
names, extra-network stripping, previews cut short by Interrupt."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from a1111_stub.harness import a1111, load_model_as_a1111, merge_like_a1111  # noqa: F401
from lora_dreambooth.guard import state_hash


def test_merged_a1111_loras_are_restored_through_the_extension(a1111, tiny_sd1):
    from lora_dreambooth.host import a1111 as host

    base = state_hash(tiny_sd1)
    unet = tiny_sd1.model.diffusion_model
    for layer in (unet.input_blocks[1][1].proj_in, unet.out[2]):
        merge_like_a1111(layer, torch.ones_like(layer.weight))
    unet.input_blocks[1][1].norm.network_current_names = ()  # seen by A1111, nothing merged
    a1111.networks.loaded_networks.append(object())
    assert state_hash(tiny_sd1) != base
    assert host.deactivate_networks(tiny_sd1) == 2
    assert state_hash(tiny_sd1) == base and a1111.networks.loaded_networks == []
    assert unet.out[2].network_current_names == ()


def test_without_the_lora_extension_nothing_breaks(a1111, tiny_sd1, monkeypatch):
    from lora_dreambooth.host import a1111 as host

    monkeypatch.setitem(sys.modules, "networks", None)  # extension disabled: import fails
    assert host.lora_extension() is None
    assert host.deactivate_networks(tiny_sd1) == 0 and host.refresh_lora_list() is False


def test_progress_lands_in_shared_state(a1111):
    from lora_dreambooth.host.progress import ProgressBridge, format_eta
    from lora_dreambooth.train import Progress

    bridge = ProgressBridge(400)
    bridge.update(Progress(12, 400, 0.12345, 1e-4, 3.0, 125.0))
    state = a1111.state
    assert (state.job_no, state.job_count) == (12, 400)
    assert state.textinfo == "Step 12/400 · loss 0.1235 · LR 1.00e-04"  # A1111's bar adds the ETA
    bridge.update(Progress(0, 400, math.nan, 0.0, 0.0, 0.0, "encoding"))
    assert state.textinfo.startswith("Encoding images and prompts") and state.job_no == 0
    assert format_eta(3725) == "1:02:05"


def test_previews_are_jobs_of_their_own_so_the_bar_never_goes_back(a1111):
    """4 steps, a preview every 2: jobs step1 step2 preview step3 step4 preview."""
    from lora_dreambooth.host.progress import ProgressBridge, planned_previews
    from lora_dreambooth.train import Progress

    assert [planned_previews(0, 4, 2), planned_previews(0, 5, 2), planned_previews(4, 6, 2),
            planned_previews(0, 4, 0)] == [2, 3, 1, 0]
    state = a1111.state
    bridge = ProgressBridge(4, preview_every=2)
    seen = []

    def fraction() -> float:
        return (state.job_no + (state.sampling_step / state.sampling_steps if state.sampling_steps else 0)) / state.job_count

    for step in (1, 2, 3, 4):
        bridge.update(Progress(step, 4, 0.1, 1e-4, 1.0, 1.0))
        seen.append(fraction())
        if step % 2 == 0:
            bridge.begin_preview(step)
            assert state.textinfo == f"Drawing the preview at step {step}/4…"
            state.sampling_steps = 20
            for state.sampling_step in (10, 20):  # what A1111's sampler does
                seen.append(fraction())
            state.nextjob()
            seen.append(fraction())
            bridge.end_preview()
            assert state.textinfo.startswith(f"Step {step}/4")
            seen.append(fraction())
    assert state.job_count == 6 and seen == sorted(seen) and seen[-1] == 1.0
    resumed = ProgressBridge(2, preview_every=2)  # a resumed run: steps 5 and 6 of 6
    resumed.update(Progress(5, 6, 0.1, 1e-4, 1.0, 1.0))
    assert (state.job_no, state.job_count) == (1, 3)


@pytest.mark.parametrize("given, expected", [
    ("../../etc/passwd", "passwd"), ("C:\\Users\\me\\photo 1.PNG", "photo_1.png"), ("..", "image"),
    (".hidden.jpg", "hidden.jpg"), ("wpg (3).png", "wpg_3.png"), ("ünï cødé.webp", "n_c_d.webp"),
    ("x" * 300 + ".png", "x" * 96 + ".png"),
])
def test_file_names_are_sanitised(a1111, given, expected):
    from lora_dreambooth.host.files import sanitise_name

    assert sanitise_name(given) == expected


@pytest.mark.parametrize("given, expected", [
    ("sks <lora:other:0.7>, portrait", "sks, portrait"),
    ("<lora:a:1>, sks, <hypernet:b:1>, photo", "sks, photo"),
    ("a,b <lyco:c:1>", "a,b"),
])
def test_extra_networks_are_stripped_from_preview_prompts(a1111, given, expected):
    from lora_dreambooth.host.render import strip_extra_networks

    assert strip_extra_networks(given) == expected


def test_an_interrupted_preview_is_no_picture_and_the_last_stays(a1111, tiny_sd1):
    from lora_dreambooth.config import TrainConfig
    from lora_dreambooth.host.job import _Previews
    from lora_dreambooth.host.progress import ProgressBridge

    load_model_as_a1111(a1111.shared, tiny_sd1)
    stop = []
    previews = _Previews(TrainConfig(resolution=64, preview_steps=2), ProgressBridge(10), lambda: bool(stop))
    first = previews.render(1)
    assert first.size == (64, 64) and previews.last is first
    a1111.state.interrupt()  # Interrupt pressed while the preview samples: A1111 returns no image
    assert previews.render(2) is None and previews.last is first
    stop.append(True)
    assert previews.render(3) is None and previews.last is first
