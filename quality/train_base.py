"""``python -m quality.train_base``: train the world's base model from scratch, on CPU, with
fixed seeds: first the VAE, then the UNet together with the text encoder. Writes
``quality/model/shapes-sd1.safetensors`` + ``.yaml`` and the CLIP folder they name.

The VAE learns to reconstruct the world's pictures, each speckled with small random dots and
strokes of any colour so that it reconstructs small details in general (the character's eyes
among them) without ever seeing the character; its loss weighs every pixel by how much it
differs from its neighbourhood, or the few pixels of a dot drown in the picture's flat areas
(with plain pixel losses it never learnt to draw them: error 114 of 255 on the eyes after
3000 steps, against 34 after 500 with the weighting). It trains on whole pictures
(not crops: its GroupNorms normalise over the whole picture, and a VAE trained on crops
washes out backgrounds and small details of whole ones). After it, the checkpoint is written
once (VAE final, UNet untrained) so the judge can start.
The latent scale factor is 1/std of the latents, as SD's 0.18215 was chosen. The UNet and
the text encoder then learn the world's captions (10% empty, for classifier-free guidance)
with the model's own noise schedule and min-SNR-5 weighting (the extension's own
``objective.min_snr_weights``), and their exponential moving average is saved.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import DDPMScheduler

from lora_dreambooth.objective import min_snr_weights

from . import base_model, world

SEED = 14


def speckle(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """2-6 small dots or short strokes of random colours (half of them black) on an HWC uint8 picture."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    canvas = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3) * (rng.random() > 0.5))  # half black
        x, y = rng.uniform(4, world.SIZE - 4, 2)
        r = rng.uniform(1.5, 4.5)
        if rng.random() < 0.7:
            canvas.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            dx, dy = rng.uniform(-10, 10, 2)
            canvas.line((x, y, x + dx, y + dy), fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(picture)


def render_world(per_thing: int, seed_base: int) -> tuple[torch.Tensor, list[world.Thing]]:
    """``per_thing`` pictures of each of the world's things, as uint8 NCHW, and what each shows."""
    things = [thing for thing in world.ALL_THINGS for _ in range(per_thing)]
    seeds = [seed_base + index * 100_000 + i for index in range(len(world.ALL_THINGS)) for i in range(per_thing)]
    return world.render(things, seeds), things


def to_unit(pixels_u8: torch.Tensor) -> torch.Tensor:
    return pixels_u8.float() / 127.5 - 1.0


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def detail_weights(x: torch.Tensor) -> torch.Tensor:
    """1 + 20 × how far each pixel is from the mean of its 5×5 neighbourhood: flat areas weigh
    1, a dot's pixels about 10."""
    blurred = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    return 1 + 20 * (x - blurred).abs().mean(1, keepdim=True)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + L2 on pixels weighted by ``detail_weights``, plus the same unweighted and L1 on
    the differences to the neighbours (edges)."""
    (ry, rx), (xy, xx) = _edges(recon), _edges(x)
    weights = detail_weights(x)
    weighted = (weights * ((recon - x).abs() + (recon - x) ** 2)).mean() / weights.mean()
    return weighted + F.l1_loss(recon, x) + F.mse_loss(recon, x) + F.l1_loss(ry, xy) + F.l1_loss(rx, xx)


def train_vae(model, pictures: torch.Tensor, steps: int, log) -> None:
    vae = model.first_stage_model
    vae.requires_grad_(True)
    params = [p for p in vae.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    rng = np.random.default_rng(SEED)
    gen = torch.Generator().manual_seed(SEED)
    started = time.time()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(pictures), (12,), generator=gen)
        batch = pictures[idx].permute(0, 2, 3, 1).numpy()
        batch = np.stack([speckle(p, rng) for p in batch])
        x = to_unit(torch.from_numpy(batch).permute(0, 3, 1, 2))
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample())
        loss = reconstruction_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    vae.requires_grad_(False)


@torch.no_grad()
def character_reconstruction(model) -> float:
    """Mean absolute error (0-255) of the VAE on the character's eyes region: are the eyes
    still there after a round trip? (The VAE never saw the character.)"""
    x = to_unit(world.render([world.CHARACTER] * 16, [7_000 + i for i in range(16)]))
    recon = model.first_stage_model.decode(model.first_stage_model.encode(x).mode())
    dark = (x < -0.8).all(dim=1, keepdim=True).expand_as(x)  # the eyes: the only black pixels
    return ((recon - x).abs()[dark].mean() * 127.5).item()


@torch.no_grad()
def encode_moments(model, pictures: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's mean and std of every picture, [N, 8, h, w]."""
    out = []
    for chunk in pictures.split(128):
        posterior = model.first_stage_model.encode(to_unit(chunk))
        out.append(torch.cat([posterior.mean, posterior.std], dim=1))
    return torch.cat(out)


def train_unet(model, moments: torch.Tensor, things: list[world.Thing], steps: int, batch: int, log) -> None:
    """Denoising on the world's latents and captions; the EMA of the UNet and text encoder is
    left in the model."""
    unet, text = model.model.diffusion_model, model.cond_stage_model.transformer
    unet.requires_grad_(True)
    text.requires_grad_(True)
    trained = [p for p in unet.parameters()] + [p for p in text.parameters()]
    ema = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": 1e-3},
                                   {"params": list(text.parameters()), "lr": 5e-4}], weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    alphas = model.alphas_cumprod.float()
    scheduler = DDPMScheduler(trained_betas=model.betas.float().numpy())
    rng = np.random.default_rng(SEED + 1)
    gen = torch.Generator().manual_seed(SEED + 1)
    started = time.time()
    for step in range(steps):
        scale = min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * scale
        idx = torch.randint(0, len(moments), (batch,), generator=gen)
        mean, std = moments[idx].chunk(2, dim=1)
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * model.scale_factor
        captions = [world.sample_caption(things[i], rng) for i in idx.tolist()]
        context = model.get_learned_conditioning(captions)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        per_sample = F.mse_loss(model.apply_model(noisy, t, context), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t, 5.0, "eps")).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, p in zip(ema, trained):
                average.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    with torch.no_grad():
        for average, p in zip(ema, trained):
            p.copy_(average)
    unet.requires_grad_(False)
    text.requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quality.train_base", description=__doc__.splitlines()[0])
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--per-thing", type=int, default=200, help="pictures of each shape and colour")
    parser.add_argument("--out", default=base_model.CHECKPOINT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    clip_dir = base_model.write_clip_folder()
    config = base_model.model_config(clip_dir=clip_dir)
    model = base_model.build(config)
    pictures, things = render_world(args.per_thing, seed_base=1_000_000)
    log(f"rendered {len(pictures)} pictures of {len(world.ALL_THINGS)} things")
    train_vae(model, pictures, args.vae_steps, log)
    log(f"VAE error on the character's eyes (never seen): {character_reconstruction(model):.1f} of 255")
    base_model.save(model, config, args.out)  # the VAE is final: the judge can train from here on
    moments = encode_moments(model, pictures)
    std = moments[:, :4].std().item()
    model.scale_factor = 1.0 / std
    config["model"]["params"]["scale_factor"] = round(1.0 / std, 5)
    log(f"latent std {std:.4f}: scale factor {1.0 / std:.5f}")
    train_unet(model, moments, things, args.unet_steps, args.batch, log)
    base_model.save(model, config, args.out)
    log(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
