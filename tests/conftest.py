"""Shared fixtures: tiny ldm models built in code (random weights, CPU, seconds)."""
from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

GOLDEN = os.path.join(ROOT, "tests", "golden")  # tables from the real A1111 loader (see its README)

# One intra-op thread: the tiny models gain nothing from two, and on a shared 2-core machine
# torch's spinning worker threads make small ops wait ~15 ms each (tests 10-100x slower).
import torch  # noqa: E402

torch.set_num_threads(1)


#: Two code paths doing the same float32 sums in another order agree to this.
ROUNDING = {"rtol": 1e-5, "atol": 1e-6}

#: A half-precision base as A1111 holds it: bf16 with numbers on the CPU, fp16 on the meta device
#: (dtypes and shapes, no kernels: torch 2.1.2's CPU build has no fp16 matmul).
LOW_PRECISION_BASES = [pytest.param(torch.bfloat16, "cpu", id="bf16-cpu"),
                       pytest.param(torch.float16, "meta", id="fp16-meta")]


@pytest.fixture()
def encoded_prompts(monkeypatch) -> list[tuple[list[str], bool]]:
    """Every ``LdmBackend.encode_prompts`` call during the test: (prompts, whether grad was on)."""
    from lora_dreambooth.model import LdmBackend

    calls: list[tuple[list[str], bool]] = []
    original = LdmBackend.encode_prompts

    def spy(self, prompts, *args, **kwargs):
        calls.append((list(prompts), torch.is_grad_enabled()))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(LdmBackend, "encode_prompts", spy)
    return calls


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    from lora_dreambooth.tiny import write_tiny_clip
    return write_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="session")
def _tiny_sd1_pristine(tiny_clip_dir):
    from lora_dreambooth.tiny import build_tiny_sd1
    return build_tiny_sd1(seed=0, clip_dir=tiny_clip_dir)


@pytest.fixture()
def tiny_sd1(_tiny_sd1_pristine):
    """A fresh tiny SD1 LatentDiffusion (fp32, eval) for each test: tests may change it."""
    return copy.deepcopy(_tiny_sd1_pristine)
