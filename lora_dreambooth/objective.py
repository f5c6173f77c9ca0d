"""The DreamBooth objective: what one micro-batch's loss is made of.

The denoising MSE per sample (against the noise, or the velocity for "v" models) is weighted by
min-SNR-γ when asked, then the instance samples' mean plus the regularization strength times
the class samples' mean (prior preservation: class samples are present only with it).
"""
from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr


def prior_preservation_loss(per_sample: torch.Tensor, is_class: torch.Tensor, strength: float) -> torch.Tensor:
    """DreamBooth's loss: instance MSE + strength × class MSE (class samples present only
    with prior preservation)."""
    loss = per_sample[~is_class].mean()
    if is_class.any():
        loss = loss + strength * per_sample[is_class].mean()
    return loss


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR for ε-prediction, min(SNR, γ) / (SNR + 1)
    for v-prediction; all ones when γ is 0 (off)."""
    if not gamma:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / (snr + 1 if parameterization == "v" else snr)
