"""Resuming a LoRA of ours: the file's tensors go back exactly, the step count, LR schedule,
data order and optimizer state continue (2 + 2 steps are 4 steps, bit for bit, on CPU), a file
that does not fit the settings is refused with what to change, and an intermediate file can be
promoted into the Lora folder."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_dreambooth import resume
from lora_dreambooth.adapters import inject
from lora_dreambooth.config import ConfigError, TrainConfig
from lora_dreambooth.demo import draw_character, draw_class_image, write_images
from lora_dreambooth.export import addnet_hash, kohya_tensors, promote
from lora_dreambooth.guard import ModelSnapshot
from lora_dreambooth.targets import find_targets
from lora_dreambooth.train import TrainCallbacks, TrainingError, train_lora


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    return {"instance": write_images(str(root / "instance"), draw_character, 3),
            "class": write_images(str(root / "class"), draw_class_image, 2)}


def config(images, **changes) -> TrainConfig:
    values = dict(trigger="wpg", instance_dir=images["instance"], steps=2, learning_rate=1e-3, rank=4,
                  alpha=4.0, resolution=64, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def run(model, cfg: TrainConfig, folder, lora_dir=None, callbacks=None):
    os.makedirs(folder, exist_ok=True)
    return train_lora(model, cfg, str(lora_dir or folder / "lora"), str(folder / "run"), callbacks)


def _meta(path: str) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_a_resumed_run_loads_the_file_exactly_and_counts_on(tiny_sd1, images, tmp_path):
    first = run(tiny_sd1, config(images, lr_schedule="cosine", save_optimizer=False), tmp_path / "a")
    file = load_file(first.path)

    # The file's tensors go into fresh adapters exactly: exported again, they are the file.
    source = resume.read_lora(first.path)
    assert source.steps == 2 and source.hash == _meta(first.path)["sshs_model_hash"]
    adapters = inject(tiny_sd1, find_targets(tiny_sd1, "lora"), config(images))
    try:
        resume.load_lora(source, adapters, None, config(images), "sd1")
        again = kohya_tensors(adapters)  # fp16, the file's precision
    finally:
        adapters.remove()
    assert again.keys() == file.keys() and all(torch.equal(again[k], file[k]) for k in file)

    snapshot = ModelSnapshot.take(tiny_sd1)
    progress, messages = [], []
    resumed = run(tiny_sd1, config(images, steps=3, lr_schedule="cosine", resume_from=first.path), tmp_path / "b",
                  callbacks=TrainCallbacks(on_progress=progress.append, on_log=messages.append))
    assert snapshot.differences(tiny_sd1) == []
    assert (resumed.resumed_steps, resumed.steps_done) == (2, 3)
    meta = _meta(resumed.path)
    assert (meta["ss_steps"], meta["ss_max_train_steps"]) == ("5", "5")
    assert "5 of 5 steps" in json.load(open(resumed.sidecar_path))["notes"]
    rows = list(csv.DictReader(open(tmp_path / "b" / "run" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [3, 4, 5]
    training = [p for p in progress if p.phase == "training"]
    assert [(p.step, p.total) for p in training] == [(3, 5), (4, 5), (5, 5)]
    assert "no optimizer state beside the resumed file: the optimizer starts afresh" in messages
    # The cosine schedule runs over all 5 steps and goes on from step 2.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=5)
    expected = []
    for _ in range(5):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [p.lr for p in training] == expected[2:]


@pytest.mark.parametrize("case", ["cached", "augmented-pivotal"])
def test_two_plus_two_steps_are_four_steps_bit_for_bit(tiny_sd1, images, tmp_path, case):
    """With the optimizer state, the run folder's fp32 weights, the LR schedule and the data
    stream replayed to step 2, a resumed run continues the uninterrupted one exactly (CPU,
    same seed), even from a file saved in fp16."""
    import copy
    twin = copy.deepcopy(tiny_sd1)
    extra = (dict(flip=True, noise_offset=0.05, min_snr_gamma=5.0, class_dir=images["class"],
                  class_prompt="person", regularization=0.5)
             if case == "cached" else dict(augment=True, pivotal=True, class_prompt="dog",
                                           train_text_encoder=True, embedding_lr=1e-2))
    common = dict(gradient_accumulation=2, lr_schedule="constant_with_warmup", lr_warmup_steps=1, **extra)
    straight = run(tiny_sd1, config(images, steps=4, save_dtype="fp32", **common), tmp_path / "straight")

    first = run(twin, config(images, steps=2, **common), tmp_path / "first")  # fp16 file
    state = resume.find_state(first.path, str(tmp_path / "first"))
    assert state == str(tmp_path / "first" / "run" / resume.OPTIMIZER_FILE)
    messages, encodes = [], []
    hook = twin.first_stage_model.encoder.register_forward_hook(lambda *args: encodes.append(1))
    try:
        second = run(twin, config(images, steps=2, save_dtype="fp32", resume_from=first.path,
                                  resume_optimizer=state, **common),
                     tmp_path / "second", callbacks=TrainCallbacks(on_log=messages.append))
    finally:
        hook.remove()
    assert f"optimizer state of step 2 loaded from {state}" in messages
    # The replay of steps 1-2 runs no VAE: augmented images are encoded only for steps 3-4
    # (2 micro-batches each); cached ones once per image variant, before training.
    if case != "cached":
        assert len(encodes) == 2 * 2
    assert first.losses + second.losses == straight.losses
    a, b = load_file(straight.path), load_file(second.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _meta(second.path)["ss_steps"] == "4"


def test_the_optimizer_state_beside_a_file_is_used_only_when_it_is_that_files(tiny_sd1, images, tmp_path):
    # The run folder keeps one state, the last save's: the intermediate at step 2 has none.
    full = run(tiny_sd1, config(images, steps=4, save_every=2), tmp_path / "a")
    intermediate = str(tmp_path / "a" / "run" / "wpg-step00002.safetensors")
    assert resume.lora_hash_of_state(str(tmp_path / "a" / "run" / resume.OPTIMIZER_FILE)) == addnet_hash(full.path)
    messages = []
    resumed = run(tiny_sd1, config(images, steps=1, resume_from=intermediate), tmp_path / "b",
                  callbacks=TrainCallbacks(on_log=messages.append))
    assert _meta(resumed.path)["ss_steps"] == "3"
    assert any("belongs to another LoRA file" in m and "starts afresh" in m for m in messages)
    # Given explicitly, a state that is not the file's is an error.
    snapshot = ModelSnapshot.take(tiny_sd1)
    with pytest.raises(TrainingError, match="belongs to another LoRA file"):
        run(tiny_sd1, config(images, steps=1, resume_from=intermediate,
                             resume_optimizer=str(tmp_path / "a" / "run" / resume.OPTIMIZER_FILE)), tmp_path / "c")
    assert snapshot.differences(tiny_sd1) == []
    # Saved in the same folder as its LoRA, the state is found beside it.
    beside = run(tiny_sd1, config(images), tmp_path / "d", lora_dir=tmp_path / "d" / "run")
    messages.clear()
    run(tiny_sd1, config(images, steps=1, resume_from=beside.path), tmp_path / "e",
        callbacks=TrainCallbacks(on_log=messages.append))
    assert any(m.startswith("optimizer state of step 2 loaded") for m in messages)


@pytest.fixture()
def lora_file(tiny_sd1, images, tmp_path_factory) -> str:
    return run(tiny_sd1, config(images, save_optimizer=False), tmp_path_factory.mktemp("source")).path


@pytest.mark.parametrize("changes, message", [
    (dict(rank=8), "its rank is 4: set rank to 4"),
    (dict(alpha=2.0), "its alpha is 4: set alpha to 4"),
    (dict(network="loha"), "it is a LoRA network: set network type to lora"),
    (dict(train_text_encoder=True),
     "has no tensors for 12 of what these settings train .*turn 'train text encoder' off"),
    (dict(pivotal=True), "no bundled embedding for this trigger"),
])
def test_a_file_that_does_not_fit_is_refused_with_what_to_change(tiny_sd1, images, tmp_path, lora_file,
                                                                 changes, message):
    snapshot = ModelSnapshot.take(tiny_sd1)
    with pytest.raises(TrainingError, match=message):
        run(tiny_sd1, config(images, resume_from=lora_file, **changes), tmp_path)
    assert snapshot.differences(tiny_sd1) == []
    assert not (tmp_path / "lora").exists()


def test_files_without_our_metadata_are_checked_by_their_tensors(tiny_sd1, images, tmp_path, lora_file):
    bare = str(tmp_path / "bare.safetensors")
    save_file(load_file(lora_file), bare, {"ss_steps": "2"})
    with pytest.raises(TrainingError, match=r"\(4, 32\) in the file, \(8, 32\) here \(another rank\)"):
        run(tiny_sd1, config(images, resume_from=bare, rank=8), tmp_path)
    save_file(load_file(lora_file), bare, {})
    with pytest.raises(resume.ResumeError, match="records no step count"):
        run(tiny_sd1, config(images, resume_from=bare), tmp_path)
    with pytest.raises(resume.ResumeError, match="no such file"):
        run(tiny_sd1, config(images, resume_from=str(tmp_path / "gone.safetensors")), tmp_path)
    with pytest.raises(ConfigError, match="never unpickled"):
        config(images, resume_from=str(tmp_path / "old.ckpt")).validate()


def test_promote_copies_an_intermediate_into_the_lora_folder(tiny_sd1, images, tmp_path):
    run(tiny_sd1, config(images, steps=4, save_every=2), tmp_path)
    intermediate = str(tmp_path / "run" / "wpg-step00002.safetensors")
    lora_dir = tmp_path / "Lora"

    promoted = promote(intermediate, str(lora_dir))
    assert promoted.path == str(lora_dir / "wpg-step00002.safetensors") and promoted.name == "wpg-step00002"
    meta = _meta(promoted.path)
    assert meta["ss_output_name"] == meta["modelspec.title"] == "wpg-step00002"
    assert meta["sshs_model_hash"] == addnet_hash(promoted.path) == _meta(intermediate)["sshs_model_hash"]
    assert meta["ss_steps"] == "2"
    a, b = load_file(intermediate), load_file(promoted.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(promoted.sidecar_path)) == json.load(open(intermediate[:-len(".safetensors")] + ".json"))

    named = promote(intermediate, str(lora_dir), name="wpg-early")
    assert named.name == "wpg-early" and _meta(named.path)["ss_output_name"] == "wpg-early"
    again = promote(intermediate, str(lora_dir), name="wpg-early")
    assert again.name == "wpg-early-1"
    os.remove(intermediate[:-len(".safetensors")] + ".json")
    replaced = promote(intermediate, str(lora_dir), overwrite=True, name="wpg-early")
    assert replaced.name == "wpg-early"
    assert json.load(open(replaced.sidecar_path))["activation text"] == "wpg"  # from the metadata
    assert sorted(os.listdir(lora_dir)) == sorted(
        f"{n}.{e}" for n in ("wpg-step00002", "wpg-early", "wpg-early-1") for e in ("json", "safetensors"))
    with pytest.raises(ValueError, match="path characters"):
        promote(intermediate, str(lora_dir), name="../x")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        promote(str(tmp_path / "run" / "loss.csv"), str(lora_dir))
