"""The dataset: instance (and class) images held at training size, the latent cache, and the
endless stream of micro-batches a run trains on."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from ..config import TrainConfig
from .augment import augment, flipped_crop
from .buckets import bucket_sizes, closest_bucket, resize_crop
from .captions import TagPolicy, instance_prompt, tags
from .images import IMAGE_EXTENSIONS, ImageError, Skipped, load_image, scan_folder

#: Images encoded per call of the encoder when caching latents.
CACHE_BATCH_SIZE = 4


class NoImagesError(ValueError):
    """No usable instance (or, with prior preservation, class) image: nothing to train on."""


@dataclass
class MicroBatch:
    pixels: torch.Tensor | None  # [N, 3, H, W] float32 in [-1, 1] when latents are not cached
    moments: torch.Tensor | None  # [N, ...] cached encoder output when cached
    prompts: list[str]  # N prompts: instance examples first, then class examples
    is_class: torch.Tensor  # [N] bool
    original_sizes: list[tuple[int, int]]  # (height, width) of each source image
    crops: list[tuple[int, int]]  # (top, left) of the crop in the resized image
    target_size: tuple[int, int]  # (height, width) of pixels

    def share(self, index: int, count: int) -> tuple["MicroBatch", torch.Tensor]:
        """Process ``index`` of ``count``'s part of this micro-batch, and which rows it holds:
        an equal slice of the instance examples and the same slice of the class examples, so
        each part's loss weighs instance and class samples as the whole batch's does."""
        if count == 1:
            return self, torch.arange(len(self.prompts))
        n_instance = int((~self.is_class).sum())
        n_class = len(self.prompts) - n_instance
        if n_instance % count or n_class % count:
            raise ValueError(f"a micro-batch of {n_instance} instance and {n_class} class samples cannot be "
                             f"split evenly between {count} processes")
        i, c = n_instance // count, n_class // count
        rows = torch.cat([torch.arange(index * i, (index + 1) * i),
                          torch.arange(n_instance + index * c, n_instance + (index + 1) * c)])
        picked = rows.tolist()
        return MicroBatch(
            pixels=self.pixels[rows] if self.pixels is not None else None,
            moments=self.moments[rows] if self.moments is not None else None,
            prompts=[self.prompts[r] for r in picked], is_class=self.is_class[rows],
            original_sizes=[self.original_sizes[r] for r in picked], crops=[self.crops[r] for r in picked],
            target_size=self.target_size), rows


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
    """Instance (and class) images prepared at training size; see the package doc.

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
    * Instance prompts go through the config's tag options (``shuffle_tags``,
      ``keep_tokens``, ``tag_dropout``) at every use; the class prompt, which the prior was
      generated with, is used as it is. ``prompts_vary`` says whether any prompt can change.
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
        self.tag_policy = TagPolicy(bool(config.shuffle_tags), int(config.keep_tokens),
                                    float(config.tag_dropout))

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
        #: Whether micro-batches carry prompts that change from use to use (then
        #: :meth:`prompts` lists only the prompts as written, not every variant).
        self.prompts_vary = any(self.tag_policy.varies(ex.prompt) for ex in self.instances)

        folder = os.path.basename(os.path.normpath(instance_dir)) or instance_dir
        freq: dict[str, int] = {}
        for ex in self.instances:
            for tag in tags(ex.prompt):
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
        out, resized, crop = resize_crop(img, tw, th)
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
        """Every distinct prompt as written, instance prompts first (in file order), then the
        class one. With ``prompts_vary``, micro-batches also carry variants not listed here."""
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
        """One micro-batch; draws from ``g`` in this order: flips or augmentation, then the
        instance prompts' tag options."""
        n = len(examples)
        pixels = moments = None
        if self.cached:
            if self.flip:
                sides = (torch.rand(n, generator=g) < 0.5).tolist()
            else:
                sides = [False] * n
            moments = torch.stack([ex.moments[1 if s else 0] for ex, s in zip(examples, sides)])
            crops = [_crop(ex, s) for ex, s in zip(examples, sides)]
        else:
            pixels, crops = self._pixels(examples, g)
        prompts = [self.tag_policy.apply(ex.prompt, g) if i < n_instance else ex.prompt
                   for i, ex in enumerate(examples)]
        is_class = torch.tensor([i >= n_instance for i in range(n)], dtype=torch.bool)
        originals = [ex.original_size for ex in examples]
        return MicroBatch(pixels, moments, prompts, is_class, originals, crops, examples[0].target)

    def _pixels(self, examples: list[_Example], g: torch.Generator
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Float pixels in [-1, 1] (mirrored or augmented as configured) and their crops."""
        x = torch.stack([ex.image for ex in examples]).float()
        crops = [ex.crop for ex in examples]
        if self.augment:
            x, crops = augment(x, crops, [ex.resized_size[1] for ex in examples], g)
        elif self.flip:
            sides = torch.rand(len(examples), generator=g) < 0.5
            if bool(sides.any()):
                x = torch.where(sides[:, None, None, None], x.flip(-1), x)
            crops = [_crop(ex, s) for ex, s in zip(examples, sides.tolist())]
        return _to_unit(x), crops


def _crop(ex: _Example, flipped: bool) -> tuple[int, int]:
    return flipped_crop(ex.crop, ex.resized_size[1], ex.target[1]) if flipped else ex.crop


def _epoch_stream(items: list[int], g: torch.Generator) -> Iterator[int]:
    """Endless: a fresh permutation of ``items`` per epoch."""
    while True:
        for p in torch.randperm(len(items), generator=g).tolist():
            yield items[p]


def _to_unit(image_u8: torch.Tensor) -> torch.Tensor:
    return (image_u8.float() / 127.5 - 1.0).clamp_(-1.0, 1.0)
