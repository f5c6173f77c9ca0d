"""The data stage: image folders → prompts, fixed-size pixels or cached latents, micro-batches.

Nothing here knows a model. The lecture's dataset is "4 (or more) images of a character, 512 ×
512; if you just have one, scale, rotate or mirror it to make it four": instance images come
from ``config.instance_dir`` (optional same-name ``.txt`` captions), class images for prior
preservation from ``config.class_dir``.

What this module guarantees:

* Images are opened only with Pillow, restricted to image formats; nothing is ever
  unpickled (``.pt``/``.npz``/… files in a folder are skipped as unknown file types).
* Every file that is not used is reported as :class:`Skipped` with a reason (caption ``.txt``
  files are not reported). No usable instance image → :class:`NoImagesError` listing why.
* Decoded images are held once, at training size, as uint8 ``[3, H, W]`` tensors; after
  :meth:`DreamBoothDataset.cache_latents` only the encoder's moments are kept.
* All randomness (shuffling, flips, augmentation, flip-cache side) comes from the
  ``torch.Generator`` given to :meth:`DreamBoothDataset.micro_batches`.

Sizes: ``original_sizes`` and ``crops`` are ``(height, width)`` / ``(top, left)`` like SDXL's
size conditioning; ``target_size`` is ``(height, width)``. :func:`bucket_sizes` returns
``(width, height)`` like kohya.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import TrainConfig

#: File extensions read as images (lower case). Anything else (except ``.txt``) is skipped.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_EXTENSION = ".txt"

#: Pillow formats allowed to open a file (JPEG also yields MPO, multi-picture JPEG from phones;
#: DIB: BMP). Those the installed Pillow does not register are left out.
_PIL_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "GIF")

#: Augmentation strength ("scale, rotate or mirror"): rotation in degrees, crop scale range.
AUGMENT_MAX_ROTATION = 5.0
AUGMENT_SCALE = (0.8, 1.0)
#: Most extreme bucket aspect ratio (kohya: 256×1024 at 512).
MAX_BUCKET_ASPECT = 4.0
#: Images encoded per call of the encoder when caching latents.
CACHE_BATCH_SIZE = 4


class ImageError(ValueError):
    """An image file that cannot be used; the message is the reason, in words."""


class NoImagesError(ValueError):
    """No usable instance (or, with prior preservation, class) image: nothing to train on."""


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class MicroBatch:
    pixels: torch.Tensor | None  # [N, 3, H, W] float32 in [-1, 1] when latents are not cached
    moments: torch.Tensor | None  # [N, ...] cached encoder output when cached
    prompts: list[str]  # N prompts: instance examples first, then class examples
    is_class: torch.Tensor  # [N] bool
    original_sizes: list[tuple[int, int]]  # (height, width) of each source image
    crops: list[tuple[int, int]]  # (top, left) of the crop in the resized image
    target_size: tuple[int, int]  # (height, width) of pixels


# --- Reading one image ------------------------------------------------------------------

def load_image(path: str) -> Image.Image:
    """Open ``path`` as an RGB image: first frame, EXIF orientation applied, alpha on white.

    Raises :class:`ImageError` with the reason when the file is empty, not an image Pillow
    may open, truncated or otherwise unreadable.
    """
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageError(f"cannot read the file ({e.strerror or e})") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(path, formats=_pil_formats()) as img:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated: the first frame
            img.load()
            fmt = img.format
            if fmt == "PNG":
                _verify_png(path)
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # broken EXIF must not cost a good image
                oriented = None
            if oriented is None or oriented is img:
                oriented = img.copy()
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError("image is too large (Pillow's decompression-bomb limit)") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (or not png/jpeg/webp/bmp/gif)") from None
    except MemoryError:
        raise
    except Exception as e:  # any decoder failure means: this file cannot be used
        text = str(e) or type(e).__name__
        if "truncated" in text.lower():
            raise ImageError(f"truncated or incomplete image ({text})") from None
        raise ImageError(f"unreadable image ({text})") from None
    if oriented.width < 1 or oriented.height < 1:
        raise ImageError("image has no pixels")
    return to_rgb(oriented)


def _pil_formats() -> list[str]:
    Image.init()
    return [f for f in _PIL_FORMATS if f in Image.OPEN]


def _verify_png(path: str) -> None:
    """Catch truncated PNGs even if someone set ``ImageFile.LOAD_TRUNCATED_IMAGES``."""
    with Image.open(path, formats=("PNG",)) as check:
        check.verify()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. Alpha/transparency is composited on white; 16-bit
    grayscale (``I;16*``, and ``I`` as Pillow opens 16-bit PNGs) is scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"unsupported colour mode {mode} ({e})") from None


# --- Sizes ----------------------------------------------------------------------------

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


def _resize_crop(img: Image.Image, target_w: int, target_h: int):
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


# --- Folders and captions -------------------------------------------------------------

def scan_folder(folder: str) -> tuple[list[str], dict[str, str], list[Skipped]]:
    """Image paths (sorted), captions by image path, and skipped entries of ``folder``.
    Hidden files (``.name``: OS litter, our class-image manifest) are ignored silently."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    captions_by_stem = {os.path.splitext(n)[0]: n for n in names
                        if os.path.splitext(n)[1].lower() == CAPTION_EXTENSION
                        and os.path.isfile(os.path.join(folder, n))}
    images, captions, skipped = [], {}, []
    for name in names:
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        if os.path.isdir(path):
            skipped.append(Skipped(path, "a folder (images in subfolders are not read)"))
            continue
        if ext.lower() == CAPTION_EXTENSION:
            continue
        if ext.lower() not in IMAGE_EXTENSIONS:
            kind = f"'{ext}'" if ext else "no extension"
            skipped.append(Skipped(path, f"not an image file type ({kind}; "
                                         f"supported: {', '.join(IMAGE_EXTENSIONS)})"))
            continue
        images.append(path)
        if stem in captions_by_stem:
            captions[path] = read_caption(os.path.join(folder, captions_by_stem[stem]))
    return images, captions, skipped


def read_caption(path: str) -> str:
    """A caption file as one line: lines joined with ", ", whitespace collapsed."""
    try:
        with open(path, "r", encoding="utf-8-sig", errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    parts = [" ".join(line.split()) for line in text.splitlines()]
    return ", ".join(p.strip(" ,") for p in parts if p.strip(" ,"))


def instance_prompt(trigger: str, caption: str) -> str:
    """"<trigger>, <caption>"; the trigger alone without a caption; a caption that already
    starts with the trigger tag is used as it is."""
    trigger = trigger.strip()
    caption = caption.strip(" ,")
    if not caption:
        return trigger
    if caption.split(",")[0].strip() == trigger:
        return caption
    return f"{trigger}, {caption}"


def _tags(prompt: str) -> list[str]:
    return [t.strip() for t in prompt.split(",") if t.strip()]


# --- The dataset ----------------------------------------------------------------------

@dataclass
class _Example:
    path: str
    prompt: str
    is_class: bool
    original_size: tuple[int, int]  # (h, w)
    resized_size: tuple[int, int]  # (h, w) of the cover-resized image
    crop: tuple[int, int]  # (top, left) in the resized image
    target: tuple[int, int]  # (h, w)
    image: torch.Tensor | None = None  # uint8 [3, h, w]
    moments: torch.Tensor | None = None  # [variants, ...] when cached
    bucket: tuple[int, int] = (0, 0)  # (w, h)


class DreamBoothDataset:
    """Instance (and class) images prepared at training size; see the module doc.

    Micro-batch policy:

    * Without buckets, instance examples are an endless stream of epochs (each epoch a fresh
      permutation of every image) cut into micro-batches of exactly ``batch_size``; a batch
      may span two epochs (the lecture's arithmetic: 15 samples at batch 2 = 8 steps).
    * With buckets, each epoch shuffles every bucket, cuts it into batches of ``batch_size``
      (the last batch of a bucket is **smaller**, never padded with repeats) and shuffles the
      order of all batches. A micro-batch never mixes buckets.
    * With prior preservation, each micro-batch of k instance examples carries k class
      examples of the same size, drawn from an independent endless epoch stream (per bucket).
      Class images go to the closest bucket among those the instance images use; a used
      bucket that would get no class image also gets the (up to) ``max(4, batch_size)`` class
      images closest in aspect ratio, prepared for it.
    """

    def __init__(self, config: TrainConfig, on_progress: Callable[[str], None] | None = None):
        self.config = config
        self._say = on_progress or (lambda _msg: None)
        self.skipped: list[Skipped] = []
        self.resolution = int(config.resolution)
        self.buckets = bucket_sizes(self.resolution) if config.buckets else None
        self.augment = bool(config.augment)
        self.flip = bool(config.flip) or self.augment
        self.cacheable = not self.augment
        self.cached = False
        self.trigger = config.trigger.strip()
        self.class_prompt = config.class_prompt.strip()
        self.prior_preservation = config.regularization > 0

        instance_dir = config.instance_dir
        square = (self.resolution, self.resolution)
        self.instances: list[_Example] = []
        for path, img, prompt in self._read_folder(instance_dir, "instance"):
            bucket = closest_bucket(img.width, img.height, self.buckets) if self.buckets else square
            self.instances.append(self._prepare(path, img, prompt, False, bucket))
        if not self.instances:
            raise NoImagesError(self._no_images_message("instance", instance_dir))
        self.classes: list[_Example] = []
        self.num_class_images = 0
        if self.prior_preservation:
            self._prepare_classes(config.class_dir)
            if not self.classes:
                raise NoImagesError(self._no_images_message("class", config.class_dir))
        self.num_instance_images = len(self.instances)
        self.bucket_counts: dict[tuple[int, int], int] = {}
        for ex in self.instances:
            self.bucket_counts[ex.bucket] = self.bucket_counts.get(ex.bucket, 0) + 1

        folder = os.path.basename(os.path.normpath(instance_dir)) or instance_dir
        freq: dict[str, int] = {}
        for ex in self.instances:
            for tag in _tags(ex.prompt):
                freq[tag] = freq.get(tag, 0) + 1
        self.tag_frequency: dict[str, dict[str, int]] = {folder: freq}
        self._say(f"{self.num_instance_images} instance images"
                  + (f", {self.num_class_images} class images" if self.prior_preservation else "")
                  + (f", {len(self.skipped)} files skipped" if self.skipped else ""))

    # -- loading

    def _read_folder(self, folder: str, kind: str) -> Iterator[tuple[str, Image.Image, str]]:
        """(path, RGB image, prompt) for each usable image, one decoded original at a time;
        unusable files go to ``skipped``."""
        if not folder or not os.path.isdir(folder):
            return
        paths, captions, skipped = scan_folder(folder)
        self.skipped.extend(skipped)
        for i, path in enumerate(paths):
            self._say(f"Reading {kind} images {i + 1}/{len(paths)}")
            try:
                img = load_image(path)
            except ImageError as e:
                self.skipped.append(Skipped(path, str(e)))
                continue
            if kind == "instance":
                prompt = instance_prompt(self.trigger, captions.get(path, ""))
            else:
                prompt = self.class_prompt
            yield path, img, prompt

    def _no_images_message(self, kind: str, folder: str) -> str:
        if not folder:
            return f"No {kind} image folder was given."
        if not os.path.isdir(folder):
            return f"The {kind} image folder '{folder}' does not exist or is not a folder."
        where = os.path.abspath(folder)
        mine = [s for s in self.skipped if os.path.dirname(os.path.abspath(s.path)) == where]
        msg = (f"No usable {kind} images in '{folder}' "
               f"(supported: {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}).")
        if not mine:
            return msg + " The folder has no image files."
        lines = [f"  {os.path.basename(s.path)}: {s.reason}" for s in mine[:30]]
        if len(mine) > 30:
            lines.append(f"  … and {len(mine) - 30} more")
        return msg + " Skipped:\n" + "\n".join(lines)

    def _prepare(self, path: str, img: Image.Image, prompt: str, is_class: bool,
                 bucket: tuple[int, int]) -> _Example:
        tw, th = bucket
        out, resized, crop = _resize_crop(img, tw, th)
        tensor = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return _Example(path=path, prompt=prompt, is_class=is_class,
                        original_size=(img.height, img.width), resized_size=resized, crop=crop,
                        target=(th, tw), image=tensor, bucket=bucket)

    def _prepare_classes(self, folder: str) -> None:
        square = (self.resolution, self.resolution)
        used = sorted({ex.bucket for ex in self.instances}, key=lambda b: (b[0] / b[1], b[0]))
        shapes: list[tuple[str, int, int, str]] = []  # (path, w, h, prompt)
        for path, img, prompt in self._read_folder(folder, "class"):
            bucket = closest_bucket(img.width, img.height, used) if self.buckets else square
            self.classes.append(self._prepare(path, img, prompt, True, bucket))
            shapes.append((path, img.width, img.height, prompt))
        self.num_class_images = len(shapes)
        if not self.buckets or not shapes:
            return
        have = {ex.bucket for ex in self.classes}
        per_bucket = max(4, int(self.config.batch_size))
        for bucket in used:
            if bucket in have:
                continue
            ratio = math.log(bucket[0] / bucket[1])
            nearest = sorted(shapes, key=lambda t: abs(math.log(t[1] / t[2]) - ratio))
            for path, _w, _h, prompt in nearest[:per_bucket]:
                self.classes.append(self._prepare(path, load_image(path), prompt, True, bucket))

    # -- public

    def prompts(self) -> list[str]:
        """Every distinct prompt, instance prompts first (in file order), then the class one."""
        seen: dict[str, None] = {}
        for ex in self.instances + self.classes:
            seen.setdefault(ex.prompt, None)
        return list(seen)

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor],
                      on_progress: Callable[[int, int], None] | None = None,
                      batch_size: int = CACHE_BATCH_SIZE) -> None:
        """Encode every example once (and its mirror image with ``flip``) and keep the
        encoder's output on the CPU; pixels are dropped afterwards.

        ``encode`` gets float32 CPU pixels ``[B, 3, H, W]`` in [-1, 1], all of one size and
        B ≤ ``batch_size``; it returns ``[B, ...]`` (the VAE's moments); whatever dtype it
        returns is kept. ``on_progress(done, total)`` counts encoded images."""
        if not self.cacheable:
            raise RuntimeError("augmentation changes the pixels at every step: latents cannot "
                               "be cached (turn off 'augment', or don't cache)")
        if self.cached:
            return
        variants = 2 if self.flip else 1
        examples = self.instances + self.classes
        groups: dict[tuple[int, int], list[_Example]] = {}
        for ex in examples:
            groups.setdefault(ex.target, []).append(ex)
        work = []  # (example, flipped)
        for key in sorted(groups):
            for ex in groups[key]:
                for v in range(variants):
                    work.append((ex, v == 1))
        total, done = len(work), 0
        results: dict[int, list[torch.Tensor | None]] = {id(ex): [None] * variants for ex in examples}
        if on_progress:
            on_progress(0, total)
        i = 0
        with torch.no_grad():
            while i < total:
                size = work[i][0].target
                chunk = []
                while i < total and len(chunk) < batch_size and work[i][0].target == size:
                    chunk.append(work[i])
                    i += 1
                pixels = torch.stack([_to_unit(ex.image.flip(-1) if flipped else ex.image)
                                      for ex, flipped in chunk])
                out = encode(pixels)
                if not isinstance(out, torch.Tensor) or out.shape[0] != len(chunk):
                    raise ValueError(f"encode must return one row per image: got "
                                     f"{getattr(out, 'shape', type(out))} for {len(chunk)} images")
                out = out.detach().to("cpu")
                for row, (ex, flipped) in zip(out, chunk):
                    results[id(ex)][1 if flipped else 0] = row.clone()
                done += len(chunk)
                if on_progress:
                    on_progress(done, total)
        for ex in examples:
            ex.moments = torch.stack(results[id(ex)])
            ex.image = None  # pixels are no longer needed
        self.cached = True

    def micro_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[MicroBatch]:
        """Endless micro-batches (see the class doc for the policy)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        class_streams: dict[tuple[int, int], Iterator[int]] = {}
        if self.prior_preservation:
            by_target: dict[tuple[int, int], list[int]] = {}
            for j, ex in enumerate(self.classes):
                by_target.setdefault(ex.target, []).append(j)
            class_streams = {k: _epoch_stream(v, generator) for k, v in sorted(by_target.items())}
        for idx in self._instance_batches(batch_size, generator):
            inst = [self.instances[i] for i in idx]
            cls = []
            if self.prior_preservation:
                stream = class_streams[inst[0].target]
                cls = [self.classes[next(stream)] for _ in idx]
            yield self._assemble(inst + cls, len(inst), generator)

    # -- batching internals

    def _instance_batches(self, batch_size: int, g: torch.Generator) -> Iterator[list[int]]:
        n = len(self.instances)
        if not self.buckets:
            stream = _epoch_stream(list(range(n)), g)
            while True:
                yield [next(stream) for _ in range(batch_size)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, ex in enumerate(self.instances):
            groups.setdefault(ex.target, []).append(i)
        keys = sorted(groups)
        while True:
            batches = []
            for key in keys:
                members = groups[key]
                perm = torch.randperm(len(members), generator=g).tolist()
                shuffled = [members[p] for p in perm]
                batches += [shuffled[s:s + batch_size] for s in range(0, len(shuffled), batch_size)]
            for b in torch.randperm(len(batches), generator=g).tolist():
                yield batches[b]

    def _assemble(self, examples: list[_Example], n_instance: int, g: torch.Generator) -> MicroBatch:
        n = len(examples)
        th, tw = examples[0].target
        prompts = [ex.prompt for ex in examples]
        is_class = torch.tensor([i >= n_instance for i in range(n)], dtype=torch.bool)
        originals = [ex.original_size for ex in examples]
        if self.cached:
            if self.flip:
                sides = (torch.rand(n, generator=g) < 0.5).tolist()
            else:
                sides = [False] * n
            moments = torch.stack([ex.moments[1 if s else 0] for ex, s in zip(examples, sides)])
            crops = [_flipped_crop(ex) if s else ex.crop for ex, s in zip(examples, sides)]
            return MicroBatch(None, moments, prompts, is_class, originals, crops, (th, tw))
        x = torch.stack([ex.image for ex in examples]).float()
        crops = [ex.crop for ex in examples]
        if self.augment:
            x, crops = _augment(x, examples, g)
        elif self.flip:
            sides = torch.rand(n, generator=g) < 0.5
            if bool(sides.any()):
                x = torch.where(sides[:, None, None, None], x.flip(-1), x)
            crops = [_flipped_crop(ex) if s else ex.crop for ex, s in zip(examples, sides.tolist())]
        pixels = (x / 127.5 - 1.0).clamp_(-1.0, 1.0)
        return MicroBatch(pixels, None, prompts, is_class, originals, crops, (th, tw))


# --- Randomness helpers -------------------------------------------------------------------

def _epoch_stream(items: list[int], g: torch.Generator) -> Iterator[int]:
    """Endless: a fresh permutation of ``items`` per epoch."""
    while True:
        for p in torch.randperm(len(items), generator=g).tolist():
            yield items[p]


def _to_unit(image_u8: torch.Tensor) -> torch.Tensor:
    return (image_u8.float() / 127.5 - 1.0).clamp_(-1.0, 1.0)


def _flipped_crop(ex: _Example) -> tuple[int, int]:
    top, left = ex.crop
    return top, ex.resized_size[1] - left - ex.target[1]


def _augment(x: torch.Tensor, examples: list[_Example], g: torch.Generator):
    """Random mirror, rotation within ±AUGMENT_MAX_ROTATION° and a scale crop of
    AUGMENT_SCALE of the image, as one resample (bicubic). The crop window always lies inside
    the rotated image: no empty corners. ``x``: float [N, 3, H, W] in 0..255."""
    n, _, h, w = x.shape
    r = torch.rand(n, 5, generator=g, dtype=torch.float64).tolist()
    thetas, crops = [], []
    for (u_flip, u_rot, u_scale, u_x, u_y), ex in zip(r, examples):
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
        top = (ex.crop[0] + h / 2 + ty - scale * h / 2) / scale
        left = (ex.crop[1] + w / 2 + tx - scale * w / 2) / scale
        if u_flip < 0.5:
            left = ex.resized_size[1] / scale - left - w
        crops.append((max(0, round(top)), max(0, round(left))))
    theta = torch.tensor(thetas, dtype=x.dtype)
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    flips = torch.tensor([row[0] < 0.5 for row in r])
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out.clamp_(0.0, 255.0), crops
