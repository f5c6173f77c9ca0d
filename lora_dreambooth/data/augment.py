"""Augmentation ("scale, rotate or mirror it to make it four"): mirror, small rotation and
scale crop in one resample, and the SDXL crop coordinates of a mirrored image.

Crops are ``(top, left)`` in the cover-resized image, whose width is ``resized_width``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Augmentation strength: rotation in degrees, crop scale range.
AUGMENT_MAX_ROTATION = 5.0
AUGMENT_SCALE = (0.8, 1.0)


def flipped_crop(crop: tuple[int, int], resized_width: int, target_width: int) -> tuple[int, int]:
    """The crop of the mirrored image: the same window seen from the other side."""
    top, left = crop
    return top, resized_width - left - target_width


def augment(x: torch.Tensor, crops: list[tuple[int, int]], resized_widths: list[int],
            g: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Random mirror, rotation within ±AUGMENT_MAX_ROTATION° and a scale crop of
    AUGMENT_SCALE of the image, as one resample (bicubic). The crop window always lies inside
    the rotated image: no empty corners. ``x``: float [N, 3, H, W] in 0..255; returns it
    augmented and each sample's approximate SDXL crop."""
    n, _, h, w = x.shape
    r = torch.rand(n, 5, generator=g, dtype=torch.float64).tolist()
    thetas, out_crops = [], []
    for (u_flip, u_rot, u_scale, u_x, u_y), crop, resized_w in zip(r, crops, resized_widths):
        angle = math.radians((2 * u_rot - 1) * AUGMENT_MAX_ROTATION)
        c, s_ = abs(math.cos(angle)), abs(math.sin(angle))
        fit = min(w / (w * c + h * s_), h / (w * s_ + h * c))
        scale = min(AUGMENT_SCALE[0] + (AUGMENT_SCALE[1] - AUGMENT_SCALE[0]) * u_scale, fit)
        ex_half = scale * (w / 2 * c + h / 2 * s_)  # half extents of the rotated window
        ey_half = scale * (w / 2 * s_ + h / 2 * c)
        tx = (2 * u_x - 1) * max(0.0, w / 2 - ex_half)  # pixels
        ty = (2 * u_y - 1) * max(0.0, h / 2 - ey_half)
        ca, sa = math.cos(angle), math.sin(angle)
        # input_norm = D⁻¹ (t + scale · R · D · out_norm), D = diag(w/2, h/2)
        thetas.append([[scale * ca, -scale * sa * h / w, tx / (w / 2)],
                       [scale * sa * w / h, scale * ca, ty / (h / 2)]])
        # Approximate SDXL crop: window's top-left in the image resized by 1/scale.
        top = (crop[0] + h / 2 + ty - scale * h / 2) / scale
        left = (crop[1] + w / 2 + tx - scale * w / 2) / scale
        if u_flip < 0.5:
            left = resized_w / scale - left - w
        out_crops.append((max(0, round(top)), max(0, round(left))))
    theta = torch.tensor(thetas, dtype=x.dtype)
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    flips = torch.tensor([row[0] < 0.5 for row in r])
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out.clamp_(0.0, 255.0), out_crops
