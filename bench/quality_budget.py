"""How long does this world's subject take to learn, for any trainer? (issue 14's evidence)

Full fine-tuning of the base model's UNet -- every weight, no adapter, the same four pictures
and captions, the plain ε-MSE with uniform timesteps, AdamW (1e-4 unless told), batch 2 -- read by the
judge like the quality table (``wpg circle`` and ``a circle``, 32 seeds). Three scopes: the
whole UNet; only the SpatialTransformers (what a plain LoRA adapts); everything else
(ResBlocks and convolutions, what LoCon adds). With ``--regularization`` each step also
carries two of the base model's own class pictures, weighted like the trainer's prior
preservation. If full fine-tuning cannot learn the subject in the presets' 200 steps, no
adapter can, and the presets' figure is a fact of the world, not of the trainer.

    python bench/quality_budget.py                      # about 8 min on one core
    python bench/quality_budget.py --regularization 1 --scopes all --steps 400,800,1600
    python bench/quality_budget.py --learning-rate 5e-4 --scopes all
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm.modules.attention import SpatialTransformer  # noqa: E402

from lora_dreambooth.model import make_backend  # noqa: E402
from quality import base_model, judge as judging, sampling, world  # noqa: E402
from quality.dreambooth import CLASS, CLASS_EVAL_PROMPT, CLASS_IMAGE_COUNT, FIDELITY_PROMPT, TRIGGER  # noqa: E402

SCOPES = ("all", "attention", "rest")


def latents(model, pictures_u8: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_first_stage_encoding(model.encode_first_stage(pictures_u8.float() / 127.5 - 1))


def trainable(unet: torch.nn.Module, scope: str) -> list[torch.nn.Parameter]:
    in_attention = {id(p) for m in unet.modules() if isinstance(m, SpatialTransformer) for p in m.parameters()}
    return [p for p in unet.parameters() if scope == "all" or (id(p) in in_attention) == (scope == "attention")]


def denoising_loss(model, z: torch.Tensor, conditioning: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    pick = torch.randint(0, len(z), (len(conditioning),), generator=generator)
    t = torch.randint(0, model.num_timesteps, (len(pick),), generator=generator)
    noise = torch.randn(z[pick].shape, generator=generator)
    return F.mse_loss(model.apply_model(model.q_sample(z[pick], t, noise), t, conditioning), noise)


def run(scope: str, checkpoints: list[int], learning_rate: float, regularization: float, seeds: int,
        judge) -> None:
    """Fine-tune a fresh copy of the base model's ``scope`` and print one table line per checkpoint."""
    model = base_model.load()
    instance = latents(model, world.render([world.CHARACTER] * 4, list(range(4))))
    with torch.no_grad():
        class_pictures = sampling.sample(make_backend(model), [CLASS] * CLASS_IMAGE_COUNT, list(range(CLASS_IMAGE_COUNT)))
        instance_conditioning = model.get_learned_conditioning([f"{TRIGGER}, {CLASS}"] * 2)
        class_conditioning = model.get_learned_conditioning([CLASS] * 2)
    klass = latents(model, class_pictures)
    model.requires_grad_(False)
    params = trainable(model.model, scope)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(1)
    started = time.time()
    for step in range(1, max(checkpoints) + 1):
        loss = denoising_loss(model, instance, instance_conditioning, generator)
        if regularization:
            loss = loss + regularization * denoising_loss(model, klass, class_conditioning, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step in checkpoints:
            backend, sample_seeds = make_backend(model), [1_000 + i for i in range(seeds)]
            fidelity = sampling.sample(backend, [FIDELITY_PROMPT] * seeds, sample_seeds)
            drift = sampling.sample(backend, [CLASS_EVAL_PROMPT] * seeds, sample_seeds)
            print(f"| {scope} ({sum(p.numel() for p in params) / 1e6:.2f} M) | {step} | "
                  f"{judging.read(judge, fidelity).fraction_character():.0%} | "
                  f"{judging.read(judge, drift).fraction_character():.0%} | {time.time() - started:.0f} s |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="200,400,800", help="checkpoints to judge at")
    parser.add_argument("--scopes", default=",".join(SCOPES))
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--regularization", type=float, default=0.0)
    parser.add_argument("--seeds", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    judge = judging.load()
    print(f"full fine-tuning, AdamW lr {args.learning_rate:g}, batch 2, regularization {args.regularization:g}, "
          f"{args.seeds} seeds")
    print("| trained | steps | fidelity (wpg circle) | class drift (a circle) | time |\n|---|---|---|---|---|")
    for scope in args.scopes.split(","):
        run(scope, [int(s) for s in args.steps.split(",")], args.learning_rate, args.regularization, args.seeds, judge)
    print("reproduce with: python bench/quality_budget.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
