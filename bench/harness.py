"""What the step-time benchmarks share: our training loop timed step by step, the bare loop it
is compared with, and A1111's scaled-dot-product attention.

The bare loop is the floor a hand-written script would reach on the same model: the same
adapters, fixed latents and conditioning, UNet forward + MSE + backward + AdamW step, with the
precision tools a half-precision model needs (autocast to the weights' dtype, a loss scaler
for fp16 on CUDA — what the engine's "auto" precision uses) and the same optimizer class.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

import torch
import torch.nn.functional as F

from lora_dreambooth import loop, torch_compat
from lora_dreambooth.adapters import inject
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.model import make_backend
from lora_dreambooth.targets import find_targets
from lora_dreambooth.train import TrainCallbacks, train_lora


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The class the engine picks: 8-bit AdamW when asked for and bitsandbytes runs on CUDA."""
    bnb = loop.bitsandbytes_on_cuda(device) if config.optimizer == "adamw8bit" else None
    adamw = torch.optim.AdamW if bnb is None else bnb.optim.AdamW8bit
    return adamw(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def bare_steps(model, config: TrainConfig, steps: int) -> list[float]:
    """Seconds of each of ``steps`` bare steps (see the module's docstring)."""
    backend = make_backend(model)
    device = backend.device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    adapters = inject(model, find_targets(model, config.network, False), config)
    dtype = loop.autocast_dtype("auto", backend)
    try:
        optimizer = _optimizer(adapters.parameters_for("unet"), config, device)
        scaler = loop.loss_scaler(dtype, device)
        size = config.resolution // 8
        latents = torch.randn(config.batch_size, 4, size, size, device=device)
        with torch.no_grad(), torch_compat.autocast(device.type, dtype):
            cond = backend.encode_prompts([config.trigger] * config.batch_size)
        times = []
        with backend.gradient_checkpointing(config.gradient_checkpointing):
            for _ in range(steps):
                started = time.perf_counter()
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, 1000, (config.batch_size,), device=device)
                with torch_compat.autocast(device.type, dtype):
                    prediction = backend.predict(latents + noise, timesteps, cond)
                loss = F.mse_loss(prediction.float(), noise)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                times.append(time.perf_counter() - started)
        return times
    finally:
        adapters.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def loop_steps(model, config: TrainConfig, work: str) -> list[float]:
    """Our loop (``train_lora``, as the tab runs it), timed between consecutive progress
    callbacks, from the last report before training (the end of latent caching) on."""
    stamps: list[float] = []
    device = make_backend(model).device

    def on_progress(progress) -> None:
        if progress.phase == "training":
            sync(device)
            stamps.append(time.perf_counter())
        elif len(stamps) <= 1:  # a phase before training: the clock starts at its last report
            stamps[:] = [time.perf_counter()]

    train_lora(model, config, os.path.join(work, "lora"), os.path.join(work, "run"),
               TrainCallbacks(on_progress=on_progress))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _sdp_cross_attention(self, x, context=None, mask=None, **kwargs):
    """ldm's ``CrossAttention.forward`` as A1111's "sdp" optimization computes it."""
    if mask is not None:
        raise NotImplementedError("attention masks are not used by the UNet")
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    batch, _, inner = q.shape
    q, k, v = (t.view(batch, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(batch, -1, inner))


def _sdp_attn_block(self, x):
    """ldm's VAE ``AttnBlock.forward`` with scaled-dot-product attention (A1111's too)."""
    h = self.norm(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    b, c, height, width = q.shape
    q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, height, width)
    return x + self.proj_out(out)


@contextlib.contextmanager
def a1111_sdp_attention() -> Iterator[None]:
    """ldm's attention classes with A1111's default cross-attention optimization (SDP) while
    inside: ldm's own einsum attention keeps the whole attention matrix in fp32."""
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.model import AttnBlock

    saved = CrossAttention.forward, AttnBlock.forward
    CrossAttention.forward, AttnBlock.forward = _sdp_cross_attention, _sdp_attn_block
    try:
        yield
    finally:
        CrossAttention.forward, AttnBlock.forward = saved
