"""The data stage: image folders → prompts, fixed-size pixels or cached latents, micro-batches.

Nothing here knows a model. The lecture's dataset is "4 (or more) images of a character, 512 ×
512; if you just have one, scale, rotate or mirror it to make it four": instance images come
from ``config.instance_dir`` (optional same-name ``.txt`` captions), class images for prior
preservation from ``config.class_dir``.

One job per module: :mod:`.images` (reading files and folders), :mod:`.buckets` (training
sizes), :mod:`.captions` (captions, the trigger, tag shuffling and dropout), :mod:`.augment`
(mirror, rotation, scale crops), :mod:`.dataset` (the dataset, latent cache, micro-batches).

What this package guarantees:

* Images are opened only with Pillow, restricted to image formats; nothing is ever
  unpickled (``.pt``/``.npz``/… files in a folder are skipped as unknown file types).
* Every file that is not used is reported as :class:`Skipped` with a reason (caption ``.txt``
  files are not reported). No usable instance image → :class:`NoImagesError` listing why.
* Decoded images are held once, at training size, as uint8 ``[3, H, W]`` tensors; after
  :meth:`DreamBoothDataset.cache_latents` only the encoder's moments are kept.
* All randomness (shuffling, flips, augmentation, flip-cache side, tag shuffling and dropout)
  comes from the ``torch.Generator`` given to :meth:`DreamBoothDataset.micro_batches`.

Sizes: ``original_sizes`` and ``crops`` are ``(height, width)`` / ``(top, left)`` like SDXL's
size conditioning; ``target_size`` is ``(height, width)``. :func:`bucket_sizes` returns
``(width, height)`` like kohya.
"""
from .buckets import bucket_sizes, closest_bucket
from .captions import TagPolicy
from .dataset import DreamBoothDataset, MicroBatch, NoImagesError
from .images import IMAGE_EXTENSIONS, ImageError, Skipped, load_image, scan_folder, to_rgb

__all__ = ["IMAGE_EXTENSIONS", "DreamBoothDataset", "ImageError", "MicroBatch", "NoImagesError",
           "Skipped", "TagPolicy", "bucket_sizes", "closest_bucket", "load_image", "scan_folder",
           "to_rgb"]
