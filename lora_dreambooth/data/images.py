"""Reading image files and folders: Pillow only, restricted to image formats, nothing ever
unpickled (``.pt``/``.npz``/… in a folder are skipped as unknown file types)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .captions import CAPTION_EXTENSION, read_caption

#: File extensions read as images (lower case). Anything else (except ``.txt``) is skipped.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

#: Pillow formats allowed to open a file (JPEG also yields MPO, multi-picture JPEG from phones;
#: DIB: BMP). Those the installed Pillow does not register are left out.
_PIL_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "GIF")


class ImageError(ValueError):
    """An image file that cannot be used; the message is the reason, in words."""


@dataclass
class Skipped:
    path: str
    reason: str


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


def scan_folder(folder: str) -> tuple[list[str], dict[str, str], list[Skipped]]:
    """Image paths (sorted), captions by image path, and skipped entries of ``folder``.
    Hidden files (``.name``: OS litter, our class-image manifest) are ignored silently;
    caption ``.txt`` files are not reported."""
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
