"""The judge: a small classifier that reads a picture of the world and says its shape, its
colour and whether it shows the character (the orange disc with two eyes in place).

It trains on freshly rendered pictures and on pictures passed through the base model's VAE
(encode, sample, decode), with blur and noise, so it reads the base model's own samples.
Decoys (``world.draw_decoy``: one eye, three, a bar, eyes too low, random dots) are labelled
"not the character": without them it called 90% of such discs the character, and a LoRA that
only learned "dark marks on an orange disc" scored as if it had learned the subject.
``python -m quality.judge`` trains it, prints its accuracy on held-out rendered and
VAE-reconstructed pictures, and writes ``quality/model/judge.safetensors``.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import base_model, world

TRAIN_SEEDS = 50_000_000   # the base model's pictures start at 1_000_000; DreamBooth's at 0
HELD_OUT_SEEDS = 90_000_000


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 128, 128):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.shape = nn.Linear(width, len(world.SHAPES))
        self.colour = nn.Linear(width, len(world.COLOUR_NAMES))
        self.character = nn.Linear(width, 1)

    def forward(self, pictures_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(pictures_u8.float() / 255.0 - 0.5)
        return self.shape(h), self.colour(h), self.character(h).squeeze(1)


@dataclass(frozen=True)
class Verdicts:
    """What the judge read in each of N pictures."""

    shapes: list[str]
    colours: list[str]
    character: torch.Tensor  # bool [N]

    def fraction_character(self) -> float:
        return self.character.float().mean().item()

    def adherence(self, things: list[world.Thing]) -> float:
        """Fraction of pictures whose shape and colour are those of ``things[i]``."""
        right = [s == t.shape and c == t.colour for s, c, t in zip(self.shapes, self.colours, things)]
        return float(np.mean(right))

    def distribution(self) -> dict[tuple[str, str], float]:
        """How often each (shape, colour) was read."""
        counts: dict[tuple[str, str], float] = {}
        for key in zip(self.shapes, self.colours):
            counts[key] = counts.get(key, 0) + 1 / len(self.shapes)
        return counts


def total_variation(p: dict, q: dict) -> float:
    """Total variation distance between two distributions over the same kind of keys."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@torch.no_grad()
def read(judge: Judge, pictures_u8: torch.Tensor) -> Verdicts:
    judge.eval()
    shapes, colours, character = [], [], []
    for chunk in pictures_u8.split(256):
        s, c, e = judge(chunk)
        shapes += [world.SHAPES[i] for i in s.argmax(1).tolist()]
        colours += [world.COLOUR_NAMES[i] for i in c.argmax(1).tolist()]
        character.append(e > 0)
    return Verdicts(shapes, colours, torch.cat(character))


def load(path: str = base_model.JUDGE) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(path))
    return judge.eval()


# --- training ---------------------------------------------------------------------------

def _labels(things: list[world.Thing]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor([world.SHAPES.index(t.shape) for t in things]),
            torch.tensor([world.COLOUR_NAMES.index(t.colour) for t in things]),
            torch.tensor([float(t.character) for t in things]))


def _draw_things(rng: np.random.Generator, n: int) -> list[world.Thing]:
    """40% the character, 15% orange circles (its nearest neighbour), the rest any thing;
    then a fifth of the things that are not the character become decoys."""
    out = []
    for u in rng.random(n):
        if u < 0.4:
            out.append(world.CHARACTER)
        elif u < 0.55:
            out.append(world.Thing("circle", "orange"))
        else:
            out.append(world.ALL_THINGS[int(rng.integers(len(world.ALL_THINGS)))])
    decoy = rng.random(n) < 0.2
    return [world.DECOY if d and not t.character else t for t, d in zip(out, decoy)]


@torch.no_grad()
def vae_round_trip(model, pictures_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pictures through the base model's VAE: encode, sample the posterior, decode."""
    out = []
    for chunk in pictures_u8.split(64):
        posterior = model.first_stage_model.encode(chunk.float() / 127.5 - 1)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        x = model.first_stage_model.decode(z)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def _blur_and_noise(pictures_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    x = pictures_u8.float()
    n = len(x)
    sigma = torch.rand(n, generator=generator) * 1.2
    kernel_x = torch.arange(-2, 3).float()
    blurred = []
    for picture, s in zip(x, sigma.tolist()):
        if s < 0.3:
            blurred.append(picture)
            continue
        k = torch.exp(-kernel_x ** 2 / (2 * s * s))
        k = (k / k.sum()).view(1, 1, 1, 5).repeat(3, 1, 1, 1)
        p = F.conv2d(F.pad(picture[None], (2, 2, 0, 0), mode="replicate"), k, groups=3)
        p = F.conv2d(F.pad(p, (0, 0, 2, 2), mode="replicate"), k.transpose(2, 3), groups=3)
        blurred.append(p[0])
    x = torch.stack(blurred)
    x = x + torch.randn(x.shape, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) * 20)
    return x.clamp(0, 255).round().to(torch.uint8)


def held_out(model, per_thing: int = 20) -> tuple[torch.Tensor, list[world.Thing]]:
    things = ([t for t in world.ALL_THINGS for _ in range(per_thing)] + [world.CHARACTER] * (per_thing * 8)
              + [world.DECOY] * (per_thing * 10))
    seeds = [HELD_OUT_SEEDS + i for i in range(len(things))]
    return world.render(things, seeds), things


def accuracy(judge: Judge, pictures: torch.Tensor, things: list[world.Thing]) -> dict[str, float]:
    """Shape, colour and character right, over all pictures; and the share of decoys that
    were called the character (the false positive that matters for fidelity)."""
    v = read(judge, pictures)
    character = torch.tensor([t.character for t in things])
    decoy = torch.tensor([t.decoy for t in things])
    return {"shape": float(np.mean([s == t.shape for s, t in zip(v.shapes, things)])),
            "colour": float(np.mean([c == t.colour for c, t in zip(v.colours, things)])),
            "character": (v.character == character).float().mean().item(),
            "decoys called character": v.character[decoy].float().mean().item()}


def train(model, steps: int, log) -> Judge:
    torch.manual_seed(7)
    rng = np.random.default_rng(7)
    gen = torch.Generator().manual_seed(7)
    pool_things = _draw_things(rng, 2048)
    pool = vae_round_trip(model, world.render(pool_things, [TRAIN_SEEDS + i for i in range(len(pool_things))]), gen)
    log(f"judge: {len(pool)} VAE round-trips made")
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    seed = TRAIN_SEEDS + len(pool_things)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        fresh = _draw_things(rng, 32)
        pictures = world.render(fresh, list(range(seed, seed + 32)))
        seed += 32
        idx = torch.randint(0, len(pool), (32,), generator=gen)
        pictures = _blur_and_noise(torch.cat([pictures, pool[idx]]), gen)
        things = fresh + [pool_things[i] for i in idx.tolist()]
        shape, colour, character = _labels(things)
        judge.train()
        s, c, e = judge(pictures)
        loss = F.cross_entropy(s, shape) + F.cross_entropy(c, colour) + F.binary_cross_entropy_with_logits(e, character)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"judge step {step}/{steps} loss {loss.item():.4f}")
    return judge.eval()


def report_accuracy(judge: Judge, model) -> dict[str, dict[str, float]]:
    """Held-out accuracy on rendered and on VAE-reconstructed pictures."""
    pictures, things = held_out(model)
    reconstructed = vae_round_trip(model, pictures, torch.Generator().manual_seed(99))
    return {"rendered": accuracy(judge, pictures, things), "vae": accuracy(judge, reconstructed, things)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quality.judge", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoint", default=base_model.CHECKPOINT)
    parser.add_argument("--out", default=base_model.JUDGE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    from safetensors.torch import save_file

    model = base_model.load(args.checkpoint)
    judge = train(model, args.steps, log)
    tmp = args.out + ".tmp"
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, tmp)
    os.replace(tmp, args.out)
    for kind, figures in report_accuracy(judge, model).items():
        log(f"held-out {kind}: " + ", ".join(f"{k} {v:.1%}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
