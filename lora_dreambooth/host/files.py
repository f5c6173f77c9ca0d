"""Uploaded images: safe file names, image checks before anything is kept, atomic copies.

A file is kept only if the engine's own reader (``data.load_image``) opens it, so what the
tab and the API accept is exactly what training can use. An upload with the same bytes as an
image already in the folder (or earlier in the same upload) is skipped: it would count twice."""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..data import IMAGE_EXTENSIONS, ImageError, load_image, scan_folder
from ..export import atomic_write

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 100


def sanitise_name(name: str, fallback: str = "image") -> str:
    """A bare, portable file name: no folders (``../`` or ``C:\\``), only letters, digits,
    ``.``, ``_`` and ``-``, no leading dot, at most 100 characters, extension lower case."""
    base = re.split(r"[\\/]", name or "")[-1]
    stem, ext = os.path.splitext(base)
    stem = _UNSAFE.sub("_", stem).strip("._-") or fallback
    ext = _UNSAFE.sub("", ext).lower()
    return stem[:MAX_NAME - len(ext)] + ext


def free_path(folder: str, name: str) -> str:
    """``folder/name``, or ``folder/stem-1.ext``… when taken."""
    stem, ext = os.path.splitext(name)
    path, n = os.path.join(folder, name), 0
    while os.path.exists(path):
        n += 1
        path = os.path.join(folder, f"{stem}-{n}{ext}")
    return path


@dataclass
class UploadReport:
    saved: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def describe(self) -> str:
        lines = [f"{len(self.saved)} image{'s' if len(self.saved) != 1 else ''} added"]
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def check_image(path: str, display_name: str) -> Optional[str]:
    """Why ``path`` cannot be a training image (None: it can)."""
    ext = os.path.splitext(display_name)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        return f"not an image file type ('{ext or 'no extension'}'; supported: {', '.join(IMAGE_EXTENSIONS)})"
    try:
        load_image(path)
    except ImageError as e:
        return str(e)
    return None


def _digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Pictures:
    """The pictures kept so far, by the sha256 of their bytes: an exact copy would count twice."""

    def __init__(self, paths: Iterable[str] = ()):
        self._labels = {_digest(path): os.path.basename(path) for path in paths}

    def add(self, path: str, label: str) -> Optional[str]:
        """Keep ``path`` as ``label``; or, when it is the same picture as one kept, why not."""
        digest = _digest(path)
        if digest in self._labels:
            return f"the same picture as {self._labels[digest]}: not added twice"
        self._labels[digest] = label
        return None


def add_files(sources: Iterable[tuple[str, str]], folder: str) -> UploadReport:
    """Copy each ``(path, original name)`` that is a readable image, and not the same bytes as
    an image in ``folder`` or one copied before it, into ``folder`` under its sanitised name;
    report the others with their reason."""
    report = UploadReport()
    os.makedirs(folder, exist_ok=True)
    kept = _Pictures(list_images(folder))
    for path, original in sources:
        name = sanitise_name(original)
        target = free_path(folder, name)
        reason = check_image(path, name) or kept.add(path, os.path.basename(target))
        if reason:
            report.skipped.append((os.path.basename(original) or name, reason))
            continue
        atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
        report.saved.append(target)
    return report


def decode_base64(data: str) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URL; raises ValueError."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def _image_extension(payload: bytes) -> str:
    signatures = {b"\x89PNG": ".png", b"\xff\xd8": ".jpg", b"GIF8": ".gif", b"BM": ".bmp"}
    for magic, ext in signatures.items():
        if payload.startswith(magic):
            return ext
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return ".webp"
    return ".png"


def stage_base64_images(items: list, label: str) -> tuple[Optional[str], list[str], list[str]]:
    """Decode and check every image of an API request in a private temp folder.

    Each item is a base64 string (named ``image-001.<type>``) or ``{"name", "data"}``.
    Returns ``(temp folder, [], skipped)`` when every item is a usable image (``skipped``: the
    items left out as the same picture as an earlier one), else ``(None, problems, [])`` with
    the temp folder already removed: a refused request leaves nothing behind."""
    if not isinstance(items, list) or not items:
        return None, [f"{label} must be a non-empty list of base64 images"], []
    problems: list[str] = []
    skipped: list[str] = []
    kept = _Pictures()
    staging = tempfile.mkdtemp(prefix="lora-train-upload-")
    try:
        for i, item in enumerate(items, start=1):
            name, data = (item.get("name"), item.get("data")) if isinstance(item, dict) else (None, item)
            label_i = f"{label}[{i - 1}]" + (f" ({name})" if name else "")
            if not isinstance(data, str):
                problems.append(f"{label_i}: expected a base64 string")
                continue
            try:
                payload = decode_base64(data)
            except ValueError as e:
                problems.append(f"{label_i}: {e}")
                continue
            safe = sanitise_name(name if isinstance(name, str) else "", fallback=f"image-{i:03d}")
            if not os.path.splitext(safe)[1]:
                safe += _image_extension(payload)
            path = free_path(staging, safe)
            with open(path, "wb") as f:
                f.write(payload)
            reason = check_image(path, safe)
            if reason:
                problems.append(f"{label_i}: {reason}")
                continue
            copy = kept.add(path, label_i)
            if copy:
                os.remove(path)
                skipped.append(f"{label_i}: {copy}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if problems:
        shutil.rmtree(staging, ignore_errors=True)
        return None, problems, []
    return staging, [], skipped


def move_folder(source: str, target: str) -> str:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    return target


def list_images(folder: str) -> list[str]:
    if not folder or not os.path.isdir(folder):
        return []
    return scan_folder(folder)[0]


def clear_folder(folder: str) -> int:
    """Remove every file in ``folder`` (not the folder); returns how many."""
    if not os.path.isdir(folder):
        return 0
    removed = 0
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
            removed += 1
        elif os.path.isdir(path):
            shutil.rmtree(path)
            removed += 1
    return removed


def folder_problems(folder: str, label: str) -> list[str]:
    """Why ``folder`` cannot supply images for training (empty list: it can)."""
    if not folder or not os.path.isdir(folder):
        return [f"{label} folder does not exist: {folder or '(none given)'}"]
    images, _captions, skipped = scan_folder(folder)
    if any(check_image(p, os.path.basename(p)) is None for p in images):
        return []
    reasons = [f"{os.path.basename(s.path)}: {s.reason}" for s in skipped]
    reasons += [f"{os.path.basename(p)}: {check_image(p, os.path.basename(p))}" for p in images]
    detail = f" ({'; '.join(reasons[:10])})" if reasons else ""
    return [f"no usable {label} images{detail}: add at least one png/jpg/webp image"]
