"""bench/gpu_check.py cannot run on a GPU here: its --smoke run (the same code on tiny models on
the CPU) runs in the suite so it cannot rot, and what it adds around the engine is checked:
A1111's SDP attention computes what ldm's does, a missing GPU and running out of memory give
a message, not a traceback."""
from __future__ import annotations

import argparse
import re

import pytest
import torch

from bench import gpu_check
from bench.harness import a1111_sdp_attention
from lora_dreambooth.train import TrainingError


def test_smoke_run_trains_both_models_and_prints_the_table(capsys):
    assert gpu_check.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "command: python bench/gpu_check.py --smoke" in out
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in out.splitlines()
            if re.match(r"(SD1\.5|SDXL) +\|", line)}
    assert set(rows) == {"SD1.5", "SDXL"}
    for cells in rows.values():
        bare, ours, ratio = (float(c) for c in cells[4:7])
        assert bare > 0 and ours > 0 and ratio == pytest.approx(bare / ours, rel=0.01)
        assert cells[-1] == "AdamW"


def test_without_cuda_it_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--smoke" in capsys.readouterr().err


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    TrainingError("training failed"),  # the engine's, caused by an OOM below
])
def test_out_of_memory_is_a_row_of_the_table(error, capsys):
    if isinstance(error, TrainingError):
        error.__cause__ = torch.cuda.OutOfMemoryError("CUDA out of memory.")

    def build(work: str, tiny: bool) -> torch.nn.Module:
        raise error

    case = gpu_check.Case("SDXL", build, 1024, checkpointing=True, peak_target_gib=12.0)
    args = argparse.Namespace(smoke=True, resolution=None, warmup=1, steps=1, rounds=1, bitsandbytes="")
    row = gpu_check.run_case(case, args, torch.device("cpu"), torch.float32, "unused")
    assert row.error.startswith("out of GPU memory") and row.misses() == [row.error]
    assert "SDXL | 1024" in gpu_check.table([row]) and "Traceback" not in capsys.readouterr().err


def test_a1111_sdp_attention_computes_what_ldm_computes(tiny_sd1):
    from ldm.modules.attention import CrossAttention
    original = CrossAttention.forward
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        cond = tiny_sd1.get_learned_conditioning(["a photo of wpg"])
        expected = tiny_sd1.apply_model(x, t, cond), tiny_sd1.encode_first_stage(pixels).mean
        with a1111_sdp_attention():
            got = tiny_sd1.apply_model(x, t, cond), tiny_sd1.encode_first_stage(pixels).mean
    assert CrossAttention.forward is original
    for a, b in zip(got, expected):  # two attention implementations: float32 rounding apart
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
