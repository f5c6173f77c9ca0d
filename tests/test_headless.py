"""``python -m lora_dreambooth train``: a checkpoint loaded as A1111 holds it, the same run as
the tab's, a progress bar, Ctrl-C / SIGTERM saving what was trained, and bad input refused
before any training with one clear line."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT
from lora_checks import assert_lora_file_passes_export_checks
from lora_dreambooth.__main__ import main as cli
from lora_dreambooth.checkpoint import CheckpointError, load_checkpoint
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.demo import draw_character, draw_class_image, write_images
from lora_dreambooth.guard import state_hash
from lora_dreambooth.tiny import build_tiny_sd1, write_tiny_checkpoint
from lora_dreambooth.train import train_lora

#: A headless run and the in-process run do the same float32 work in the same order on one
#: thread: their adapter weights agree to this (in practice they are bit-identical).
SAME_RUN = {"rtol": 0.0, "atol": 1e-7}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The tiny SD1 model as a checkpoint with its yaml beside it (its CLIP in ``clip/``)."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("checkpoint")))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    return {"instance": write_images(str(root / "instance"), draw_character, 3),
            "class": write_images(str(root / "class"), draw_class_image, 3)}


def settings_file(folder, images: dict[str, str], **changes) -> str:
    values = TrainConfig(trigger="wpg", instance_dir=images["instance"], class_dir=images["class"],
                         class_prompt="a photo of a person", regularization=0.5, steps=3, learning_rate=1e-3,
                         batch_size=2, rank=4, alpha=4.0, resolution=64, seed=3, save_dtype="fp32").to_dict()
    values.update(changes)
    path = os.path.join(str(folder), "run.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f)
    return path


def command(settings: str, checkpoint: str, out: str, *extra: str) -> list[str]:
    return ["train", "--settings", settings, "--checkpoint", checkpoint, "--out", out, *extra]


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# --- loading -----------------------------------------------------------------------------

def test_the_checkpoint_loads_as_a1111_holds_the_model(checkpoint, tmp_path):
    """Weights from the checkpoint alone: the text encoder's folder needs only its config and
    tokenizer (as A1111's Hugging Face cache may hold no CLIP weights)."""
    clip = os.path.join(os.path.dirname(checkpoint), "clip")
    built = build_tiny_sd1(seed=0, clip_dir=clip)
    weights = [name for name in os.listdir(clip) if name.endswith((".safetensors", ".bin"))]
    for name in weights:
        os.rename(os.path.join(clip, name), tmp_path / name)
    try:
        model = load_checkpoint(checkpoint)
    finally:
        for name in weights:
            os.rename(tmp_path / name, os.path.join(clip, name))
    assert weights and state_hash(model) == state_hash(built)
    assert (model.is_sd1, model.is_sd2, model.is_sdxl) == (True, False, False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_the_config_is_repaired_as_a1111_repairs_it(checkpoint, tmp_path):
    """ldm's own activation checkpointing off (the run's setting decides), as A1111 does; the
    text encoder on the model's device, not on ldm's default "cuda"."""
    from omegaconf import OmegaConf
    config = OmegaConf.load(checkpoint[:-len(".safetensors")] + ".yaml")
    config.model.params.unet_config.params.use_checkpoint = True
    del config.model.params.cond_stage_config.params["device"]  # ldm's default: "cuda"
    copy = str(tmp_path / "model.safetensors")
    os.symlink(checkpoint, copy)
    OmegaConf.save(config, str(tmp_path / "model.yaml"))
    model = load_checkpoint(copy)
    flags = [m.checkpoint for m in model.model.diffusion_model.modules()
             if hasattr(m, "checkpoint") and isinstance(m.checkpoint, bool)]
    assert flags and not any(flags)
    assert model.cond_stage_model.device == torch.device("cpu")
    assert model.get_learned_conditioning(["a photo of wpg"]).shape == (1, 77, 32)


def test_a_webui_folder_gives_ldm_and_the_config(checkpoint, tmp_path):
    """With --webui, ldm is imported from its repositories/ and the config comes from its
    configs/ when none is beside the checkpoint (a fresh process: ldm is not imported yet)."""
    webui = tmp_path / "webui"
    ldm_repo = webui / "repositories" / "stable-diffusion-stability-ai"
    ldm_repo.mkdir(parents=True)
    (webui / "repositories" / "generative-models").mkdir()
    import ldm
    os.symlink(os.path.dirname(ldm.__file__), ldm_repo / "ldm")  # the same ldm, at the webui's path
    (webui / "configs").mkdir()
    os.replace(checkpoint[:-len(".safetensors")] + ".yaml", webui / "configs" / "v1-inference.yaml")
    moved = str(tmp_path / "model.safetensors")
    os.symlink(checkpoint, moved)
    try:
        script = ("from lora_dreambooth.checkpoint import load_checkpoint; "
                  f"m = load_checkpoint({moved!r}, {str(webui)!r}); import ldm; print(ldm.__file__, m.is_sd1)")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                             timeout=120)
    finally:
        os.replace(webui / "configs" / "v1-inference.yaml", checkpoint[:-len(".safetensors")] + ".yaml")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == [str(ldm_repo / "ldm" / "__init__.py"), "True"]


def test_checkpoints_that_cannot_be_loaded_say_why(checkpoint, tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="never opens"):
        load_checkpoint(str(pickle))
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(str(garbage))
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not an SD 1.x, SD 2.x or SDXL checkpoint"):
        load_checkpoint(str(other))
    no_yaml = tmp_path / "no-yaml.safetensors"
    os.symlink(checkpoint, no_yaml)
    with pytest.raises(CheckpointError, match="put its yaml beside it"):
        load_checkpoint(str(no_yaml))


# --- the run -----------------------------------------------------------------------------

def test_a_headless_run_trains_what_the_tab_trains(checkpoint, images, tmp_path, capsys):
    """Same settings and seed: the same adapter weights and ss_* metadata as ``train_lora``
    on the model in memory (how the tab calls it), and the same files."""
    settings = settings_file(tmp_path, images, pivotal=True, gradient_accumulation=2, preview_every=3,
                             preview_steps=2)
    out = str(tmp_path / "headless")
    assert cli(command(settings, checkpoint, out)) == 0
    headless_file = os.path.join(out, "wpg.safetensors")

    config = TrainConfig.from_dict(json.load(open(settings)))
    model = build_tiny_sd1(seed=0, clip_dir=os.path.join(os.path.dirname(checkpoint), "clip"))
    tab = train_lora(model, config, str(tmp_path / "tab"), str(tmp_path / "tab" / "run"))

    ours, theirs = load_file(headless_file), load_file(tab.path)
    assert set(ours) == set(theirs) and any(k.startswith("bundle_emb.wpg.") for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], **SAME_RUN, msg=key)
    with safe_open(headless_file, "pt") as f, safe_open(tab.path, "pt") as g:
        a, b = f.metadata(), g.metadata()
    ss = sorted(k for k in a if k.startswith("ss_"))
    assert ss == sorted(k for k in b if k.startswith("ss_")) and "ss_total_batch_size" in ss
    assert {k: a[k] for k in ss} == {k: b[k] for k in ss}

    run_dirs = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]
    assert len(run_dirs) == 1 and run_dirs[0].startswith("wpg-")
    run_dir = os.path.join(out, run_dirs[0])
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(tab.run_dir))  # config, loss, previews, optimizer
    assert json.load(open(os.path.join(run_dir, "config.json"))) == config.to_dict()
    assert sorted(os.listdir(out)) == sorted(["wpg.safetensors", "wpg.json", "wpg.png", run_dirs[0]])
    assert_lora_file_passes_export_checks(headless_file, model, config)
    printed = capsys.readouterr()
    assert "finished after 3 steps" in printed.out and f"saved {headless_file}" in printed.out
    assert "3/3" in printed.err  # the tqdm bar reached the end


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_the_run_and_saves_what_was_trained(sig, checkpoint, images, tmp_path):
    settings = settings_file(tmp_path, images, steps=2000, batch_size=1)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "lora_dreambooth", *command(settings, checkpoint, str(out))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        wait_for_steps(out, 1, process)
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and f"{signal.Signals(sig).name}: stopping" in stderr
    with safe_open(str(out / "wpg.safetensors"), "pt") as f:
        steps = int(f.metadata()["ss_steps"])
    assert 1 <= steps < 2000 and f"stopped after {steps} steps" in stdout
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    assert len(list(csv.DictReader(open(run_dir / "loss.csv")))) == steps


def wait_for_steps(out, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run folder's loss.csv has ``steps`` rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        for run_dir in (p for p in out.iterdir() if p.is_dir()) if out.is_dir() else ():
            loss = run_dir / "loss.csv"
            if loss.is_file() and len(loss.read_text().splitlines()) > steps:
                return
        time.sleep(0.1)
    raise AssertionError("the run did not reach its first steps")


# --- bad input -----------------------------------------------------------------------------

def bad_inputs(tmp_path, images, checkpoint) -> dict[str, tuple[list[str], list[str]]]:
    """case → (command, what the error names)."""
    good = settings_file(tmp_path, images)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(dict(json.load(open(good)), learnig_rate=1e-4, stepz=3)))
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps(dict(json.load(open(good)), rank=0, network="lorax")))
    broken = tmp_path / "broken.json"
    broken.write_text("{\"steps\": ")
    no_images = tmp_path / "no-images.json"
    no_images.write_text(json.dumps(dict(json.load(open(good)), instance_dir=str(tmp_path / "nowhere"))))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    out = str(tmp_path / "out")
    return {
        "unknown keys": (command(str(unknown), checkpoint, out), ["unknown setting 'learnig_rate'",
                                                                  "unknown setting 'stepz'"]),
        "invalid values": (command(str(invalid), checkpoint, out), ["rank must be between", "network type must be"]),
        "not json": (command(str(broken), checkpoint, out), ["is not valid JSON"]),
        "no settings file": (command(str(tmp_path / "missing.json"), checkpoint, out), ["cannot read the settings"]),
        "no instance folder": (command(str(no_images), checkpoint, out), ["instance image folder"]),
        "pickle checkpoint": (command(good, str(pickle), out), ["never opens"]),
        "missing checkpoint": (command(good, str(tmp_path / "none.safetensors"), out), ["no such file"]),
        "output not writable": (command(good, checkpoint, str(a_file / "out")), ["cannot write to the output folder"]),
    }


def test_bad_input_is_one_clear_error_before_any_training(checkpoint, images, tmp_path, capsys):
    for case, (argv, named) in bad_inputs(tmp_path, images, checkpoint).items():
        assert cli(argv) == 1, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and all(text in err for text in named), (case, err)
        assert "training…" not in err, case
        assert not os.path.exists(tmp_path / "out" / "wpg.safetensors"), case


def test_bad_input_exits_non_zero_without_a_traceback(checkpoint, images, tmp_path):
    argv, named = bad_inputs(tmp_path, images, checkpoint)["unknown keys"]
    done = subprocess.run([sys.executable, "-m", "lora_dreambooth", *argv], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert all(text in done.stderr for text in named)
