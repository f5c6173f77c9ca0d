"""Data-parallel training under ``accelerate launch``, on CPU with gloo: two processes at batch 1
train the LoRA one process trains at batch 2, only the main process writes, a Ctrl-C to the
launcher saves, and why the tab's runs stay without accelerate."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_checks import assert_lora_file_passes_export_checks
from lora_dreambooth.config import TrainConfig, epoch_arithmetic
from lora_dreambooth.data import MicroBatch
from lora_dreambooth.tiny import build_tiny_sd1, write_tiny_checkpoint
from lora_dreambooth.train import train_lora
from test_headless import command, images, settings_file, subprocess_env, wait_for_steps  # noqa: F401

#: Two processes average their gradients after each backward (gloo's sum, halved); one process
#: sums the same per-sample gradients inside each layer's backward: the same numbers added in
#: another order, gradients equal to ~1e-10. AdamW turns that into weight differences of up to
#: lr / eps × 1e-10 per step (1e-3 / 1e-8: 1e-5) for elements whose gradient is near zero, so
#: the bound is a tenth of one step's update, 1e-4; measured 3e-6 to 3.4e-5 over tiny models
#: of different random weights. Without the averaging they differ by 6e-3.
SAME_SAMPLES = {"rtol": 1e-3, "atol": 1e-4}


def launch(processes: int, argv: list[str], **popen) -> subprocess.Popen:
    """``accelerate launch --multi_gpu --num_processes N -m lora_dreambooth …``. On a machine
    without CUDA, accelerate 0.21.0 runs these as MULTI_CPU processes over gloo (``--cpu``
    with several processes would need MPI: it starts one process)."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return subprocess.Popen([accelerate, "launch", "--multi_gpu", "--num_processes", str(processes),
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", str(free_port()), "-m", "lora_dreambooth", *argv],
                            env=subprocess_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("checkpoint")))


@pytest.fixture(scope="module")
def two_processes(checkpoint, images, tmp_path_factory):
    """A 2-process run at batch 1 (prior preservation, accumulation 2, pivotal tuning, a
    preview, and what draws from the generator or changes the backward: flips, noise offset,
    min-SNR, gradient checkpointing): (its output folder, its settings, what it printed)."""
    folder = tmp_path_factory.mktemp("two")
    settings = settings_file(folder, images, batch_size=1, gradient_accumulation=2, pivotal=True,
                             preview_every=3, preview_steps=2, flip=True, noise_offset=0.05, min_snr_gamma=5.0,
                             gradient_checkpointing=True)
    out = folder / "out"
    process = launch(2, command(settings, checkpoint, str(out)))
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return out, TrainConfig.from_dict(json.load(open(settings))), stdout, stderr


def test_two_processes_at_batch_1_train_what_one_process_at_batch_2_does(two_processes, checkpoint, tmp_path):
    out, config, _, _ = two_processes
    model = build_tiny_sd1(seed=0, clip_dir=os.path.join(os.path.dirname(checkpoint), "clip"))
    one = train_lora(model, TrainConfig.from_dict(dict(config.to_dict(), batch_size=2)), str(tmp_path),
                     str(tmp_path / "run"))
    two, single = load_file(str(out / "wpg.safetensors")), load_file(one.path)
    assert set(two) == set(single) and any(k.startswith("bundle_emb.") for k in two)
    moved = max((single[k] - build_zero(single[k], k)).abs().max().item() for k in single)
    assert moved > 1e-3  # the adapters trained: the comparison below means something
    for key in two:
        torch.testing.assert_close(two[key], single[key], **SAME_SAMPLES, msg=lambda m, key=key: f"{key}: {m}")
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    two_losses = [float(r["loss"]) for r in csv.DictReader(open(run_dir / "loss.csv"))]
    one_losses = [float(r["loss"]) for r in csv.DictReader(open(os.path.join(one.run_dir, "loss.csv")))]
    assert two_losses == pytest.approx(one_losses, rel=1e-4)  # the loss of all samples, not of process 0's


def build_zero(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """What a tensor starts from: lora_up (peft's lora_B) is zero at first; others are random."""
    return torch.zeros_like(tensor) if key.endswith("lora_up.weight") else tensor


def test_only_the_main_process_writes_and_the_file_says_two_processes(two_processes, checkpoint):
    out, config, stdout, stderr = two_processes
    run_dirs = [p for p in out.iterdir() if p.is_dir()]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["wpg.json", "wpg.png", "wpg.safetensors"]
    assert len(run_dirs) == 1
    assert sorted(p.name for p in run_dirs[0].iterdir()) == ["config.json", "loss.csv", "optimizer.safetensors",
                                                              "preview-00003.png"]
    assert [int(r["step"]) for r in csv.DictReader(open(run_dirs[0] / "loss.csv"))] == [1, 2, 3]
    assert stdout.count("finished after 3 steps") == 1 and stderr.count("data-parallel on 2 processes") == 1
    # the lecture's arithmetic, once: 3 images, 1 × 2 × 2 = 4 samples per step
    assert stderr.count("3 images, batch 1, accumulation 2 × 2 processes, 3 steps → 12 samples, 4 epochs") == 1
    model = build_tiny_sd1(seed=0, clip_dir=os.path.join(os.path.dirname(checkpoint), "clip"))
    metadata = assert_lora_file_passes_export_checks(str(out / "wpg.safetensors"), model, config)
    # 1 sample × 2 micro-batches × 2 processes per step
    assert (metadata["ss_batch_size_per_device"], metadata["ss_gradient_accumulation_steps"],
            metadata["ss_total_batch_size"]) == ("1", "2", "4")
    notes = json.load(open(out / "wpg.json"))["notes"]
    assert "batch 1 × accumulation 2 × 2 processes" in notes


def test_ctrl_c_to_the_launcher_saves_what_was_trained(checkpoint, images, tmp_path):
    """A Ctrl-C reaches the launcher and its processes (the terminal signals the whole group;
    the launcher passes it on again): they agree on where to stop, and the main one saves."""
    settings = settings_file(tmp_path, images, batch_size=1, steps=2000)
    out = tmp_path / "out"
    process = launch(2, command(settings, checkpoint, str(out)), start_new_session=True)
    try:
        wait_for_steps(out, 1, process, timeout=300)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    with safe_open(str(out / "wpg.safetensors"), "pt") as f:
        steps = int(f.metadata()["ss_steps"])
    assert 1 <= steps < 2000 and f"stopped after {steps} steps" in stdout, stderr
    # The launcher (torch elastic) reports the signal with its own SignalException traceback;
    # the training processes print none.
    launcher_traceback = stderr[stderr.find("Traceback"):] if "Traceback" in stderr else ""
    assert "lora_dreambooth" not in launcher_traceback
    assert stderr.count("Traceback") <= 1 and stderr.count("SIGINT: stopping after this micro-batch") == 1


def test_a_micro_batch_is_shared_evenly_between_processes():
    batch = MicroBatch(pixels=torch.arange(8.0).reshape(8, 1, 1, 1), moments=None,
                       prompts=[f"i{n}" for n in range(4)] + [f"c{n}" for n in range(4)],
                       is_class=torch.tensor([False] * 4 + [True] * 4), original_sizes=[(n, n) for n in range(8)],
                       crops=[(0, n) for n in range(8)], target_size=(64, 64))
    parts = [batch.share(index, 2) for index in range(2)]
    assert [part.prompts for part, _ in parts] == [["i0", "i1", "c0", "c1"], ["i2", "i3", "c2", "c3"]]
    assert [rows.tolist() for _, rows in parts] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert parts[1][0].pixels.flatten().tolist() == [2.0, 3.0, 6.0, 7.0]
    assert parts[1][0].is_class.tolist() == [False, False, True, True] and parts[1][0].crops[0] == (0, 2)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        batch.share(0, 3)


def test_the_arithmetic_counts_every_process():
    arithmetic = epoch_arithmetic(images=4, batch_size=1, accumulation=2, steps=100, processes=2)
    assert arithmetic.samples_per_step == 4 and arithmetic.epochs == 100
    assert arithmetic.describe(1, 2, 100, processes=2) == ("4 images, batch 1, accumulation 2 × 2 processes, "
                                                           "100 steps → 400 samples, 100 epochs")


def test_buckets_are_refused_on_several_processes_before_the_model_is_touched(tiny_sd1, images, tmp_path):
    from lora_dreambooth.config import ConfigError
    from lora_dreambooth.distributed import SingleProcess

    class TwoProcesses(SingleProcess):
        num_processes = 2

    config = TrainConfig(trigger="wpg", instance_dir=images["instance"], buckets=True, resolution=64, steps=1)
    with pytest.raises(ConfigError, match="buckets cannot be trained on 2 processes"):
        train_lora(tiny_sd1, config, str(tmp_path), str(tmp_path / "run"), parallel=TwoProcesses())
    assert not os.path.exists(tmp_path / "run")


def test_accelerate_state_is_one_per_process():
    """Why the tab's runs use no Accelerator (distributed.py): in accelerate 0.21.0 a second
    Accelerator in the same process cannot have another precision, and resetting the state
    changes the first one's behind its back."""
    script = """
from accelerate import Accelerator
from accelerate.state import AcceleratorState
first = Accelerator(mixed_precision="no", cpu=True)
try:
    Accelerator(mixed_precision="bf16", cpu=True)
    print("second accepted")
except ValueError as error:
    print("second refused:", error)
AcceleratorState._reset_state()
Accelerator(mixed_precision="bf16", cpu=True)
print("first now", first.mixed_precision)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert "second refused: AcceleratorState has already been initialized and cannot be changed" in done.stdout
    assert "first now bf16" in done.stdout


def test_a_run_in_one_process_leaves_accelerate_alone(tiny_sd1, images, tmp_path):
    """The tab's and the API's runs (no ``parallel``) create no accelerate state that would
    fix the precision of a later run or another extension in the same A1111 process."""
    from accelerate.state import AcceleratorState, PartialState

    config = TrainConfig(trigger="wpg", instance_dir=images["instance"], resolution=64, steps=1, rank=4, alpha=4.0)
    result = train_lora(tiny_sd1, config, str(tmp_path), str(tmp_path / "run"))
    assert result.path and result.steps_done == 1
    assert AcceleratorState._shared_state == {} and PartialState._shared_state == {}
