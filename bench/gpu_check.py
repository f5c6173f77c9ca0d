"""GPU check: the tab's training path on full-size SD1.5 and SDXL-shaped models held in fp16 on
CUDA as A1111 holds them (random weights, nothing downloaded), against a bare loop in the same run.

    python bench/gpu_check.py            # one CUDA GPU, under 8 minutes; prints the table
    python bench/gpu_check.py --smoke    # the same code at tiny size on the CPU (fp32), < 2 min
    python bench/gpu_check.py | tee bench/results/gpu_check-<gpu>.txt   # keep a GPU run's table

Each case builds its model on the CPU (fp32, random weights), halves it as A1111 does without
--no-half (``alphas_cumprod`` stays fp32) and moves it to the GPU; ldm's attention runs A1111's
default SDP optimization. Then, in alternating rounds, the bare loop (``harness.bare_steps``)
and ours (``train_lora``, as the tab calls it: precision "auto" = fp16 autocast and loss
scaler, LoRA rank 16, batch 1, gradient checkpointing for SDXL, 8-bit AdamW when bitsandbytes
imports). Reported per case: it/s of both (median step) and their ratio (target ≤ 1.05), the
peak VRAM allocated during our run, fp16 model included (target for SDXL at 1024 px: ≤ 12 GiB,
a 12 GB card), and VRAM allocated before and after our run (target: back within 64 MiB).
UNets and VAEs have the real shapes (SD1.5 UNet 860 M parameters, SDXL 2567 M, OpenCLIP bigG
695 M); CLIP-L has a tiny vocabulary and a 2× MLP (57 M of 123 M parameters): a real
checkpoint holds ~0.12 GiB more in fp16.
Exit status 1 when a target is missed or a case failed (never with --smoke, whose timings
on a CPU mean nothing).
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.full_size import sd15_model, sdxl_model  # noqa: E402
from bench.harness import a1111_sdp_attention, bare_steps, loop_steps  # noqa: E402
from lora_dreambooth import loop  # noqa: E402
from lora_dreambooth.config import TrainConfig  # noqa: E402
from lora_dreambooth.demo import draw_character, write_images  # noqa: E402
from lora_dreambooth.tiny import build_tiny_sd1  # noqa: E402
from tests.tiny_models import build_tiny_sdxl  # noqa: E402

MIB, GIB = 2 ** 20, 2 ** 30
RATIO_TARGET = 1.05
RETURN_TARGET_MIB = 64


@dataclass(frozen=True)
class Case:
    label: str
    build: Callable[[str, bool], torch.nn.Module]  # (work folder, tiny) → model, fp32 on the CPU
    resolution: int
    checkpointing: bool
    peak_target_gib: Optional[float] = None


@dataclass
class Row:
    case: Case
    resolution: int
    unet_params: float = 0.0    # millions
    model_gib: float = 0.0      # weights and buffers as held
    bare_its: float = 0.0
    ours_its: float = 0.0
    peak_gib: Optional[float] = None       # CUDA only
    reserved_gib: Optional[float] = None
    before_mib: Optional[float] = None
    after_mib: Optional[float] = None
    optimizer: str = ""
    error: str = ""

    @property
    def ratio(self) -> float:
        return self.bare_its / self.ours_its if self.ours_its else float("nan")

    def misses(self) -> list[str]:
        """The targets this row misses (CUDA runs)."""
        if self.error:
            return [self.error]
        missed = []
        if self.ratio > RATIO_TARGET:
            missed.append(f"ours/bare {self.ratio:.2f} > {RATIO_TARGET}")
        if self.case.peak_target_gib and self.peak_gib is not None and self.peak_gib > self.case.peak_target_gib:
            missed.append(f"peak {self.peak_gib:.2f} GiB > {self.case.peak_target_gib} GiB")
        if self.after_mib is not None and self.after_mib - self.before_mib > RETURN_TARGET_MIB:
            missed.append(f"VRAM +{self.after_mib - self.before_mib:.0f} MiB after the run")
        return missed


# --- models ----------------------------------------------------------------------------------

def sd15(work: str, tiny: bool) -> torch.nn.Module:
    """SD1.5 (``full_size.sd15_model``), or the tiny SD1."""
    return build_tiny_sd1() if tiny else sd15_model(work)


def sdxl(work: str, tiny: bool) -> torch.nn.Module:
    """SDXL base (``full_size.sdxl_model``: CLIP-L with a 2× MLP, OpenCLIP bigG, SDXL's UNet,
    SD's VAE), or the tiny SDXL it is built as."""
    return build_tiny_sdxl() if tiny else sdxl_model(work)


CASES = (Case("SD1.5", sd15, 512, checkpointing=False),
         Case("SDXL", sdxl, 1024, checkpointing=True, peak_target_gib=12.0))


def hold_as_a1111(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """A1111 without --no-half: every weight and buffer in fp16 but ``alphas_cumprod`` (kept
    fp32), on the GPU, the text embedders told their device."""
    alphas_cumprod = model.alphas_cumprod
    model.to(dtype)
    model.alphas_cumprod = alphas_cumprod
    model.to(device)
    for module in model.modules():
        if isinstance(vars(module).get("device"), str):
            module.device = device.type


# --- one case --------------------------------------------------------------------------------

def _is_out_of_memory(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def _measured_loop(model, config: TrainConfig, work: str, row: Row, device: torch.device) -> list[float]:
    """Our loop once, with VRAM before, peak during and after (CUDA)."""
    if device.type != "cuda":
        return loop_steps(model, config, work)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = loop_steps(model, config, work)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    peak, reserved = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
    row.peak_gib = max(row.peak_gib or 0.0, peak)
    row.reserved_gib = max(row.reserved_gib or 0.0, reserved)
    if row.before_mib is None or after - before > (row.after_mib - row.before_mib) * MIB:
        row.before_mib, row.after_mib = before / MIB, after / MIB  # the worst round
    return times


def run_case(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
             work: str) -> Row:
    resolution = args.resolution or case.resolution
    row = Row(case, resolution)
    model = None
    try:
        model = case.build(os.path.join(work, case.label), args.smoke)
        hold_as_a1111(model, device, dtype)
        row.unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
        row.model_gib = sum(t.numel() * t.element_size()
                            for t in list(model.parameters()) + list(model.buffers())) / GIB
        images = write_images(os.path.join(work, case.label, "images"),
                              functools.partial(draw_character, size=resolution), 4)
        config = TrainConfig(trigger="wpg", instance_dir=images, steps=args.warmup + args.steps,
                             resolution=resolution, rank=16, alpha=16.0, learning_rate=1e-4,
                             optimizer="adamw8bit" if args.bitsandbytes else "adamw",
                             gradient_checkpointing=case.checkpointing, overwrite=True)
        row.optimizer = "AdamW8bit" if args.bitsandbytes else "AdamW"
        bare: list[float] = []
        ours: list[float] = []
        with a1111_sdp_attention():
            for round_no in range(args.rounds):
                bare += bare_steps(model, config, args.warmup + args.steps)[args.warmup:]
                run_dir = os.path.join(work, case.label, f"round{round_no}")
                ours += _measured_loop(model, config, run_dir, row, device)[args.warmup:]
        row.bare_its, row.ours_its = 1 / statistics.median(bare), 1 / statistics.median(ours)
    except Exception as error:  # noqa: BLE001 -- one case failing must not hide the others
        first_line = (str(error).splitlines() or [""])[0][:120]
        if _is_out_of_memory(error):
            row.error = f"out of GPU memory ({first_line})"
        else:
            traceback.print_exc()
            row.error = f"failed: {type(error).__name__}: {first_line}"
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# --- the table -------------------------------------------------------------------------------

def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


def _gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    header = ["case", "px", "UNet M", "model GiB", "bare it/s", "ours it/s", "ours/bare", "peak GiB",
              "reserved GiB", "before MiB", "after MiB", "optimizer"]
    lines = [header]
    for r in rows:
        lines.append([r.case.label, str(r.resolution), f"{r.unet_params:.1f}", _gib(r.model_gib)] + (
            [r.error] if r.error else
            [f"{r.bare_its:.2f}", f"{r.ours_its:.2f}", f"{r.ratio:.3f}", _gib(r.peak_gib), _gib(r.reserved_gib),
             _mib(r.before_mib), _mib(r.after_mib), r.optimizer]))
    widths = [max(len(line[i]) for line in lines if len(line) == len(header)) for i in range(len(header))]
    text = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(text)


def _environment(device: torch.device, args: argparse.Namespace) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"{props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}, fp16 weights "
                 "(CLIP-L: 57 of 123 M parameters)")
    else:
        where = "CPU, fp32 weights (--smoke: tiny models; timings and memory are not the GPU's)"
    bnb = f"bitsandbytes {args.bitsandbytes}" if args.bitsandbytes else "bitsandbytes not importable"
    return (f"torch {torch.__version__}, {where}; LoRA rank 16, batch 1, precision auto, SDP attention; "
            f"{bnb}; {args.rounds} rounds × {args.steps} timed steps after {args.warmup} warm-up steps")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the code, not the GPU")
    parser.add_argument("--steps", type=int, help="timed steps per round (default 10; --smoke 2)")
    parser.add_argument("--warmup", type=int, help="steps dropped per round (default 3; --smoke 1)")
    parser.add_argument("--rounds", type=int, help="alternating bare/ours rounds (default 2; --smoke 1)")
    parser.add_argument("--resolution", type=int, help="override every case's (default SD1.5 512, SDXL 1024; --smoke 64)")
    args = parser.parse_args(argv)
    defaults = (2, 1, 1, 64) if args.smoke else (10, 3, 2, None)
    for name, value in zip(("steps", "warmup", "rounds", "resolution"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu_check.py measures a CUDA GPU and none is available here "
              f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a machine "
              "with an NVIDIA GPU, or `python bench/gpu_check.py --smoke` to check the code on the CPU.",
              file=sys.stderr)
        return 2
    if args.smoke:  # tiny models gain nothing from more threads, and a busy CPU stalls spinning ones
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.smoke else "cuda")
    bitsandbytes = loop.bitsandbytes_on_cuda(device)  # what the engine's "adamw8bit" will use
    args.bitsandbytes = "" if bitsandbytes is None else getattr(bitsandbytes, "__version__", "?")
    dtype = torch.float32 if args.smoke else torch.float16
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        rows = [run_case(case, args, device, dtype, work) for case in CASES]
    print(f"command: python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(_environment(device, args))
    print(table(rows))
    if args.smoke:
        return 1 if any(r.error for r in rows) else 0
    missed = [f"{r.case.label}: {miss}" for r in rows for miss in r.misses()]
    print("targets: " + ("all met" if not missed else "MISSED — " + "; ".join(missed)))
    print(f"(targets: ours/bare ≤ {RATIO_TARGET}; SDXL peak ≤ 12 GiB incl. the fp16 model; "
          f"VRAM after the run within {RETURN_TARGET_MIB} MiB of before)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
