"""The model guard is a proof over every weight: a single flipped bit anywhere in the model
(any part, dtype, buffer, first or last byte, a tensor whose size is no multiple of 8 bytes
or that starts mid-word) is caught and named, and the model reads as unchanged once it is
flipped back; words moved within a tensor are caught too; every tensor is read once per check,
on its own device."""
from __future__ import annotations

import pytest
import torch

from lora_dreambooth import guard
from lora_dreambooth.guard import ModelSnapshot, state_hash

TENSORS = {
    "unet weight": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "fp16 weight": "model.diffusion_model.out.2.weight",
    "buffer": "alphas_cumprod",
    "text encoder weight": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "vae weight": "first_stage_model.encoder.conv_in.weight",
    "13-byte buffer": "odd_bytes",
    "buffer starting mid-word": "shifted",
}


@pytest.fixture
def model(tiny_sd1):
    tiny_sd1.model.diffusion_model.out[2].half()
    tiny_sd1.register_buffer("odd_bytes", torch.arange(13, dtype=torch.uint8))
    tiny_sd1.register_buffer("shifted", torch.arange(11, dtype=torch.float16)[1:], persistent=False)
    return tiny_sd1


def _tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    return dict(guard._all_tensors(model))[name]


def _flip(tensor: torch.Tensor, byte: int, bit: int) -> None:
    with torch.no_grad():
        data = tensor.detach().view(-1).view(torch.uint8)
        data[byte] ^= 1 << bit


@pytest.mark.parametrize("where, bit", [("first", 0), ("first", 7), ("last", 0), ("last", 7)])
@pytest.mark.parametrize("label", TENSORS)
def test_a_single_flipped_bit_anywhere_is_caught_and_named(model, label, where, bit):
    name = TENSORS[label]
    tensor = _tensor(model, name)
    assert label != "fp16 weight" or tensor.dtype == torch.float16
    assert label != "buffer starting mid-word" or tensor.storage_offset() % 4
    snapshot = ModelSnapshot.take(model)
    byte = 0 if where == "first" else tensor.numel() * tensor.element_size() - 1
    _flip(tensor, byte, bit)
    assert snapshot.differences(model) == [f"tensor {name} values changed"]
    assert state_hash(model) != snapshot.hash
    _flip(tensor, byte, bit)
    assert snapshot.differences(model) == [] and state_hash(model) == snapshot.hash


def test_words_swapped_across_rows_of_a_tensor_are_caught(model):
    """The positional sum: moving data within a tensor changes no plain sum, but is caught."""
    name, tensor = max(guard._all_tensors(model).items(), key=lambda item: item[1].numel())
    words = tensor.detach().view(-1).view(torch.int64)
    assert words.numel() > guard._ROW and words[0] != words[-1]
    snapshot = ModelSnapshot.take(model)
    with torch.no_grad():
        first, last = words[0].clone(), words[-1].clone()
        words[0], words[-1] = last, first
    assert snapshot.differences(model) == [f"tensor {name} values changed"]


def test_verify_keeps_what_it_found_for_the_snapshots_holder(model):
    snapshot = ModelSnapshot.take(model)
    assert snapshot.verified is None
    assert snapshot.verify(model) == [] and snapshot.verified == []
    _flip(_tensor(model, TENSORS["vae weight"]), 5, 3)
    assert snapshot.verify(model) == snapshot.verified == [f"tensor {TENSORS['vae weight']} values changed"]


def test_each_tensor_is_read_once_per_check_and_on_its_own_device(model, monkeypatch):
    """One read of every storage per snapshot and again per check (tied names read once), each
    of the model's own tensor where it lives, and no tensor copied to another device to be
    checked: one transfer of the sums. (On a CPU-only machine every device is the CPU; the
    device half bites with a GPU.)"""
    model.tied = model.model.diffusion_model.out[2]  # the same parameters under a second name
    reads: list[tuple[int, torch.device]] = []
    real = guard._checksum

    def counted(tensor: torch.Tensor) -> torch.Tensor:
        reads.append((tensor.data_ptr(), tensor.device))
        result = real(tensor)
        assert result.device == tensor.device
        return result

    monkeypatch.setattr(guard, "_checksum", counted)
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.numel()) or real_to(self, "cpu"))
    snapshot = ModelSnapshot.take(model)
    names = guard._all_tensors(model)
    storages = {(t.data_ptr(), t.device) for t in names.values()}
    assert len(reads) == len(set(reads)) and set(reads) == storages
    assert len(names) > len(reads) and copies == [2 * len(names)]  # one transfer: 2 int64 a name
    taken = list(reads)
    reads.clear()
    assert snapshot.verify(model) == []
    assert len(reads) == len(set(reads)) == len(taken) and set(reads) == storages
