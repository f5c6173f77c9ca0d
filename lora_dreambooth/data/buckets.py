"""Training sizes: kohya's aspect-ratio buckets and the cover-resize + centre crop into one.

:func:`bucket_sizes` returns ``(width, height)`` like kohya; :func:`resize_crop` reports
``(height, width)`` / ``(top, left)`` like SDXL's size conditioning."""
from __future__ import annotations

import math

from PIL import Image

#: Most extreme bucket aspect ratio (kohya: 256×1024 at 512).
MAX_BUCKET_ASPECT = 4.0


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as kohya makes them: ``(width, height)``, both multiples of 64,
    area ≤ resolution², for each width the largest height, aspect ratio within 1:4 … 4:1,
    both orientations, sorted by aspect ratio (width / height)."""
    area = resolution * resolution
    found: set[tuple[int, int]] = set()
    for w in range(64, 4 * resolution + 1, 64):
        h = (area // w) // 64 * 64
        if h < 64:
            break
        if max(w / h, h / w) <= MAX_BUCKET_ASPECT + 1e-9:
            found.add((w, h))
            found.add((h, w))
    found.add((resolution, resolution))
    return sorted(found, key=lambda s: (s[0] / s[1], s[0]))


def closest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (w, h) whose aspect ratio is closest (in log ratio) to width/height; ties go
    to the larger area."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def resize_crop(img: Image.Image, target_w: int, target_h: int
                ) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize to cover (target_w, target_h) with LANCZOS and centre-crop, in one resample.
    Returns (image, resized (h, w), crop (top, left))."""
    w, h = img.size
    scale = max(target_w / w, target_h / h)
    rw, rh = max(target_w, round(w * scale)), max(target_h, round(h * scale))
    left, top = (rw - target_w) // 2, (rh - target_h) // 2
    box = (left / scale, top / scale, (left + target_w) / scale, (top + target_h) / scale)
    box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
    out = img.resize((target_w, target_h), Image.LANCZOS, box=box)
    return out, (rh, rw), (top, left)
