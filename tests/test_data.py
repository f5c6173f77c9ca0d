"""The data stage: every image built in code in tmp_path, no model, fast."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from conftest import ROUNDING
from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data import (IMAGE_EXTENSIONS, DreamBoothDataset, ImageError, MicroBatch,
                                  NoImagesError, Skipped, bucket_sizes, closest_bucket, load_image)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def halves(w=64, h=32, left=RED, right=BLUE) -> Image.Image:
    """Left half one colour, right half another."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2:] = right
    return Image.fromarray(a)


def textured(w=96, h=96, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def solid(colour, w=48, h=48) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def make_dir(root, name, images: dict[str, Image.Image], captions: dict[str, str] | None = None):
    d = root / name
    d.mkdir()
    for fname, img in images.items():
        img.save(d / fname)
    for fname, text in (captions or {}).items():
        (d / fname).write_text(text, encoding="utf-8")
    return str(d)


def cfg(instance_dir, **kw) -> TrainConfig:
    kw.setdefault("resolution", 64)
    return TrainConfig(instance_dir=instance_dir, **kw)


def close(pixel, colour, tol=12):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


def instance_ids(batch: MicroBatch, n_instance: int | None = None):
    """Identify examples by their (solid-colour) pixels' red channel."""
    n = len(batch.prompts) if n_instance is None else n_instance
    return [round(float((batch.pixels[i, 0].mean() + 1) * 127.5)) for i in range(n)]


# --- load_image -----------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"])
def test_every_format_loads_as_rgb(tmp_path, ext):
    assert ext in IMAGE_EXTENSIONS
    path = tmp_path / f"a{ext}"
    halves(64, 32, RED, BLUE).save(path)
    img = load_image(str(path))
    assert img.mode == "RGB" and img.size == (64, 32)
    assert close(img.getpixel((5, 16)), RED, 40) and close(img.getpixel((58, 16)), BLUE, 40)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90° clockwise
    halves(64, 32, RED, BLUE).save(path, exif=exif.tobytes(), quality=95)
    assert Image.open(path).size == (64, 32)
    img = load_image(str(path))
    assert img.size == (32, 64)  # width and height swapped
    assert close(img.getpixel((16, 5)), RED, 40)  # left half went to the top
    assert close(img.getpixel((16, 58)), BLUE, 40)


def test_alpha_modes_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    la = Image.new("LA", (8, 8), (0, 0))
    la.putpixel((0, 0), (0, 255))
    la.save(tmp_path / "la.png")
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 255, 0, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    for name, opaque in [("rgba.png", RED), ("la.png", (0, 0, 0)), ("p.png", BLUE)]:
        img = load_image(str(tmp_path / name))
        assert img.mode == "RGB", name
        assert img.getpixel((0, 0)) == opaque, name
        assert img.getpixel((5, 5)) == WHITE, name  # transparent → white, not black


def test_palette_without_transparency_and_grayscale(tmp_path):
    solid(GREEN).convert("P").save(tmp_path / "p.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.bmp")
    assert close(load_image(str(tmp_path / "p.png")).getpixel((1, 1)), GREEN, 2)
    assert load_image(str(tmp_path / "l.png")).getpixel((1, 1)) == (77, 77, 77)
    assert load_image(str(tmp_path / "bw.bmp")).getpixel((1, 1)) == WHITE


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    img = load_image(str(tmp_path / "c.jpg"))
    assert img.mode == "RGB" and close(img.getpixel((2, 2)), (0, 255, 255), 8)


def test_16_bit_grayscale_scaled_not_clipped(tmp_path):
    a = np.full((8, 8), 128 * 257, np.uint16)
    a[0, 0] = 65535
    a[0, 1] = 0
    Image.fromarray(a, mode="I;16").save(tmp_path / "g16.png")
    img = load_image(str(tmp_path / "g16.png"))
    assert img.mode == "RGB"
    assert img.getpixel((3, 3)) == (128, 128, 128)  # a naive convert would clip to 255
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((1, 0)) == (0, 0, 0)
    # In memory I;16 and I (as Pillow opens 16-bit PNGs) go the same way.
    from lora_dreambooth.data import to_rgb
    assert to_rgb(Image.fromarray(a, mode="I;16")).getpixel((3, 3)) == (128, 128, 128)
    assert to_rgb(Image.fromarray(a.astype(np.int32), mode="I")).getpixel((3, 3)) == (128, 128, 128)


@pytest.mark.parametrize("ext", [".gif", ".webp"])
def test_animated_first_frame(tmp_path, ext):
    frames = [solid(RED, 16, 16), solid(BLUE, 16, 16), solid(GREEN, 16, 16)]
    path = tmp_path / f"anim{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if ext == ".webp" else {}))
    with Image.open(path) as check:
        assert check.n_frames == 3
        check.seek(2)  # leave the file handle elsewhere: load_image opens its own
    img = load_image(str(path))
    assert img.mode == "RGB" and close(img.getpixel((8, 8)), RED, 10)


def test_unreadable_files_raise_image_error(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("I am not a picture")
    solid(RED, 64, 64).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    textured(64, 64).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="empty"):
        load_image(str(tmp_path / "zero.png"))
    with pytest.raises(ImageError, match="not an image"):
        load_image(str(tmp_path / "text.png"))
    with pytest.raises(ImageError, match="truncated"):
        load_image(str(tmp_path / "cut.png"))
    with pytest.raises(ImageError, match="truncated"):
        load_image(str(tmp_path / "cut.jpg"))
    assert issubclass(ImageError, ValueError)


def test_truncated_png_caught_even_if_pillow_told_to_load_truncated(tmp_path, monkeypatch):
    solid(RED, 64, 64).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError):
        load_image(str(tmp_path / "cut.png"))


# --- folders, skipping, captions ------------------------------------------------------

def test_skipped_files_are_reported_and_captions_are_not(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    solid(RED).save(d / "good.png")
    (d / "good.txt").write_text("red shirt")
    (d / "orphan.txt").write_text("no image for me")
    (d / "zero.png").write_bytes(b"")
    (d / "fake.png").write_text("just text")
    solid(RED, 64, 64).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "full.png").unlink()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    (d / "weights.pt").write_bytes(b"\x80\x04pickle")
    (d / "sub").mkdir()
    ds = DreamBoothDataset(cfg(str(d)))
    assert ds.num_instance_images == 1
    reasons = {os.path.basename(s.path): s.reason for s in ds.skipped}
    assert all(isinstance(s, Skipped) for s in ds.skipped)
    assert set(reasons) == {"zero.png", "fake.png", "cut.png", "weights.pt", "sub"}
    assert "empty" in reasons["zero.png"]
    assert "not an image" in reasons["fake.png"]
    assert "truncated" in reasons["cut.png"]
    assert "'.pt'" in reasons["weights.pt"]


def test_no_images_error_lists_reasons(tmp_path):
    d = tmp_path / "inst"
    d.mkdir()
    (d / "zero.png").write_bytes(b"")
    (d / "notes.doc").write_text("hello")
    (d / "caption.txt").write_text("x")
    with pytest.raises(NoImagesError) as info:
        DreamBoothDataset(cfg(str(d)))
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "No usable instance images" in msg
    assert "zero.png: empty" in msg and "notes.doc: not an image file type" in msg
    assert "caption.txt" not in msg
    with pytest.raises(NoImagesError, match="does not exist"):
        DreamBoothDataset(cfg(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesError, match="no image files"):
        DreamBoothDataset(cfg(str(tmp_path / "empty")))


def test_no_class_images_with_prior_preservation(tmp_path):
    inst = make_dir(tmp_path, "inst", {"a.png": solid(RED)})
    cls = make_dir(tmp_path, "cls", {})
    with pytest.raises(NoImagesError, match="class"):
        DreamBoothDataset(cfg(inst, class_dir=cls, class_prompt="dog", regularization=1.0))
    # Without prior preservation the class folder is not read at all.
    ds = DreamBoothDataset(cfg(inst, class_dir=cls, class_prompt="dog"))
    assert ds.num_class_images == 0


def test_captions_prompts_and_tag_frequency(tmp_path):
    inst = make_dir(tmp_path, "10_sks woman",
                    {"a.png": solid(RED), "b.png": solid(GREEN), "c.jpg": solid(BLUE)},
                    {"a.txt": "red shirt, smiling\n", "c.txt": "sks, smiling, outdoors"})
    cls = make_dir(tmp_path, "cls", {"x.png": solid(WHITE)}, {"x.txt": "ignored caption"})
    ds = DreamBoothDataset(cfg(inst, trigger="sks", class_dir=cls, class_prompt="woman",
                               regularization=0.5))
    assert [e.prompt for e in ds.instances] == ["sks, red shirt, smiling", "sks",
                                                "sks, smiling, outdoors"]
    assert ds.prompts() == ["sks, red shirt, smiling", "sks", "sks, smiling, outdoors", "woman"]
    assert ds.tag_frequency == {"10_sks woman": {"sks": 3, "red shirt": 1, "smiling": 2,
                                                 "outdoors": 1}}
    batch = next(ds.micro_batches(1, torch.Generator().manual_seed(0)))
    assert batch.prompts[1] == "woman"


# --- sizes ----------------------------------------------------------------------------

def test_resize_and_centre_crop(tmp_path):
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100], a[:, 100:200], a[:, 200:] = RED, GREEN, BLUE
    inst = make_dir(tmp_path, "inst", {"wide.png": Image.fromarray(a)})
    ds = DreamBoothDataset(cfg(inst, resolution=64))
    b = next(ds.micro_batches(1, torch.Generator().manual_seed(0)))
    assert b.pixels.shape == (1, 3, 64, 64) and b.pixels.dtype == torch.float32
    assert b.pixels.min() >= -1 and b.pixels.max() <= 1
    assert b.target_size == (64, 64)
    assert b.original_sizes == [(100, 300)]
    assert b.crops == [(0, 64)]  # 300×100 → 192×64, centre crop starts at x = 64
    centre = ((b.pixels[0, :, 8:56, 8:56] + 1) * 127.5).mean(dim=(1, 2))
    assert torch.allclose(centre, torch.tensor([0.0, 255.0, 0.0]), atol=3)  # only green kept


def test_prepared_images_are_held_at_training_size(tmp_path):
    inst = make_dir(tmp_path, "inst", {"big.png": textured(640, 480)})
    ds = DreamBoothDataset(cfg(inst, resolution=64))
    assert ds.instances[0].image.shape == (3, 64, 64)
    assert ds.instances[0].image.dtype == torch.uint8


def test_bucket_sizes_follow_kohya_rules():
    for res in (256, 512, 768, 1024):
        sizes = bucket_sizes(res)
        assert (res, res) in sizes
        assert len(sizes) == len(set(sizes)) > 5
        for w, h in sizes:
            assert w % 64 == 0 and h % 64 == 0
            assert w * h <= res * res
            assert 1 / 4 <= w / h <= 4
            assert (h, w) in sizes
    assert (256, 1024) in bucket_sizes(512) and (1024, 256) in bucket_sizes(512)
    assert (320, 768) in bucket_sizes(512) and (576, 448) in bucket_sizes(512)


def test_closest_aspect_bucket_is_chosen(tmp_path):
    buckets = bucket_sizes(256)
    assert closest_bucket(300, 100, buckets) == (384, 128)
    assert closest_bucket(100, 250, buckets) == (128, 384)
    assert closest_bucket(100, 100, buckets) == (256, 256)
    for w, h in [(123, 77), (50, 400), (640, 480), (1000, 10)]:
        chosen = closest_bucket(w, h, buckets)
        best = min(abs(math.log(b[0] / b[1]) - math.log(w / h)) for b in buckets)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(w / h)) == pytest.approx(best)
    inst = make_dir(tmp_path, "inst", {"wide.png": textured(300, 100), "tall.png": textured(100, 250)})
    ds = DreamBoothDataset(cfg(inst, resolution=256, buckets=True))
    shapes = {os.path.basename(e.path): tuple(e.image.shape) for e in ds.instances}
    assert shapes == {"wide.png": (3, 128, 384), "tall.png": (3, 384, 128)}
    b = next(ds.micro_batches(2, torch.Generator().manual_seed(0)))
    assert len(b.prompts) == 1  # the two buckets are never mixed
    assert b.target_size == tuple(b.pixels.shape[2:])


def test_bucket_batches_are_single_bucket_and_cover_each_epoch(tmp_path):
    images = {f"w{i}.png": solid((10 * i, 0, 0), 96, 48) for i in range(1, 4)}
    images.update({f"s{i}.png": solid((10 * i + 100, 0, 0), 48, 48) for i in range(1, 3)})
    inst = make_dir(tmp_path, "inst", images)
    ds = DreamBoothDataset(cfg(inst, resolution=128, buckets=True))
    wide_w, wide_h = closest_bucket(96, 48, bucket_sizes(128))
    it = ds.micro_batches(2, torch.Generator().manual_seed(3))
    # One epoch = bucket of 3 → batches of 2 + 1 (smaller, not padded), bucket of 2 → 1 batch.
    for _epoch in range(3):
        seen, sizes = [], {}
        for _ in range(3):
            b = next(it)
            assert b.pixels.shape[0] == len(b.prompts) <= 2
            sizes[b.target_size] = sizes.get(b.target_size, 0) + b.pixels.shape[0]
            seen += instance_ids(b)
        assert sorted(seen) == [10, 20, 30, 110, 120]
        assert sizes == {(wide_h, wide_w): 3, (128, 128): 2}  # two buckets, 3 wide and 2 square


# --- augmentation ---------------------------------------------------------------------

def _first_pixels(ds, seed, n=3):
    it = ds.micro_batches(1, torch.Generator().manual_seed(seed))
    return torch.cat([next(it).pixels for _ in range(n)])


def test_augmentation_is_deterministic_per_seed_and_varies(tmp_path):
    inst = make_dir(tmp_path, "inst", {"a.png": textured(96, 96)})
    plain = DreamBoothDataset(cfg(inst))
    ds = DreamBoothDataset(cfg(inst, augment=True))
    assert not ds.cacheable and plain.cacheable
    a, b, c = _first_pixels(ds, 1), _first_pixels(ds, 1), _first_pixels(ds, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ref = _first_pixels(plain, 1)
    assert torch.equal(ref[0], ref[1])  # no augmentation: fixed pixels
    for i in range(3):
        assert (a[i] - ref[i]).abs().mean() > 0.01  # every step differs from the plain image
    assert not torch.equal(a[0], a[1])  # and from the previous step


def test_augmentation_leaves_no_empty_corners(tmp_path):
    inst = make_dir(tmp_path, "inst", {"w.png": solid(WHITE, 64, 64), "g.png": solid((0, 0, 0), 80, 64)})
    ds = DreamBoothDataset(cfg(inst, augment=True))
    it = ds.micro_batches(1, torch.Generator().manual_seed(0))
    for _ in range(20):
        b = next(it)
        v = b.pixels.mean()
        # a constant image stays constant: rotate-then-crop never reaches outside the picture
        assert (b.pixels - v).abs().max() < 1e-3
        assert abs(abs(float(v)) - 1) < 1e-3


def test_augment_rotates_and_scales(tmp_path):
    """A vertical stripe tilts under rotation: its columns are not constant any more."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, 28:36] = WHITE
    inst = make_dir(tmp_path, "inst", {"s.png": Image.fromarray(a)})
    ds = DreamBoothDataset(cfg(inst, augment=True))
    it = ds.micro_batches(1, torch.Generator().manual_seed(0))
    tilted = widened = 0
    for _ in range(10):
        px = next(it).pixels[0, 0]
        cols = (px > 0).float().mean(0)  # fraction of bright pixels per column
        tilted += int(((cols > 0.05) & (cols < 0.95)).sum() > 2)
        widened += int((px[32] > 0).sum() > 8)  # stripe width grows when zoomed in
    assert tilted >= 5 and widened >= 5


def test_flip_only(tmp_path):
    inst = make_dir(tmp_path, "inst", {"a.png": halves(64, 64, RED, BLUE)})
    ds = DreamBoothDataset(cfg(inst, flip=True))
    assert ds.cacheable
    it = ds.micro_batches(1, torch.Generator().manual_seed(0))
    lefts = set()
    for _ in range(16):
        b = next(it)
        red_left = bool(b.pixels[0, 0, 32, 2] > 0.9)
        lefts.add(red_left)
        assert b.crops[0] == (0, 0)
    assert lefts == {True, False}


# --- batches --------------------------------------------------------------------------

def test_prior_preservation_pairs_instance_and_class(tmp_path):
    inst = make_dir(tmp_path, "inst", {f"i{i}.png": solid((10 * i, 0, 0)) for i in range(1, 4)})
    cls = make_dir(tmp_path, "cls", {f"c{i}.png": solid((100 + 10 * i, 0, 0)) for i in range(1, 6)})
    ds = DreamBoothDataset(cfg(inst, trigger="sks", class_dir=cls, class_prompt="dog",
                               regularization=1.0))
    assert ds.num_instance_images == 3 and ds.num_class_images == 5
    it = ds.micro_batches(2, torch.Generator().manual_seed(0))
    class_seen = []
    for _ in range(5):
        b = next(it)
        assert b.pixels.shape[0] == 4
        assert b.is_class.tolist() == [False, False, True, True]
        assert b.prompts == ["sks", "sks", "dog", "dog"]
        ids = instance_ids(b)
        assert all(i < 100 for i in ids[:2]) and all(i > 100 for i in ids[2:])
        class_seen += ids[2:]
    # class images cycle on their own: every one once per 5 draws
    assert sorted(class_seen[:5]) == sorted(class_seen[5:]) == [110, 120, 130, 140, 150]
    plain = DreamBoothDataset(cfg(inst, class_dir=cls, class_prompt="dog"))
    b = next(plain.micro_batches(2, torch.Generator().manual_seed(0)))
    assert b.pixels.shape[0] == 2 and not b.is_class.any()


def test_prior_preservation_with_buckets_keeps_sizes_together(tmp_path):
    inst = make_dir(tmp_path, "inst", {"wide.png": solid((10, 0, 0), 96, 48),
                                       "square.png": solid((20, 0, 0), 48, 48)})
    cls = make_dir(tmp_path, "cls", {"c1.png": solid((110, 0, 0), 48, 48),
                                     "c2.png": solid((120, 0, 0), 50, 48)})
    ds = DreamBoothDataset(cfg(inst, buckets=True, resolution=128, class_dir=cls,
                               class_prompt="dog", regularization=1.0))
    assert ds.num_class_images == 2
    it = ds.micro_batches(1, torch.Generator().manual_seed(0))
    sizes = set()
    for _ in range(6):
        b = next(it)  # stacking would fail if the class image had another size
        assert b.is_class.tolist() == [False, True]
        sizes.add(b.target_size)
    assert len(sizes) == 2


def test_epoch_shuffling_covers_every_image_once(tmp_path):
    inst = make_dir(tmp_path, "inst", {f"i{i}.png": solid((10 * i, 0, 0)) for i in range(1, 6)})
    ds = DreamBoothDataset(cfg(inst))
    it = ds.micro_batches(2, torch.Generator().manual_seed(0))
    stream = []
    for _ in range(10):  # 20 samples = 4 epochs of 5
        b = next(it)
        assert b.pixels.shape[0] == 2
        stream += instance_ids(b)
    epochs = [stream[i:i + 5] for i in range(0, 20, 5)]
    for e in epochs:
        assert sorted(e) == [10, 20, 30, 40, 50]
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled
    again = ds.micro_batches(2, torch.Generator().manual_seed(0))
    assert instance_ids(next(again)) == stream[:2]  # same seed, same order


# --- latent cache ---------------------------------------------------------------------

class CountingEncoder:
    def __init__(self):
        self.images = 0
        self.calls = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        self.images += pixels.shape[0]
        self.calls.append(tuple(pixels.shape))
        mean = F.avg_pool2d(pixels, 8)
        return torch.cat([mean, torch.zeros_like(mean)], dim=1)  # "moments": 6 channels


def test_latent_cache_encodes_each_image_once(tmp_path):
    inst = make_dir(tmp_path, "inst", {f"i{i}.png": textured(64, 64, seed=i) for i in range(5)})
    cls = make_dir(tmp_path, "cls", {f"c{i}.png": textured(64, 64, seed=10 + i) for i in range(3)})
    ds = DreamBoothDataset(cfg(inst, class_dir=cls, class_prompt="dog", regularization=1.0))
    expected = CountingEncoder()(torch.stack([(e.image.float() / 127.5 - 1) for e in ds.instances]))
    enc, progress = CountingEncoder(), []
    ds.cache_latents(enc, on_progress=lambda d, t: progress.append((d, t)), batch_size=3)
    assert enc.images == 8
    assert all(c[0] <= 3 for c in enc.calls)
    assert progress[-1] == (8, 8) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert all(e.image is None for e in ds.instances + ds.classes)  # pixels dropped
    it = ds.micro_batches(2, torch.Generator().manual_seed(0))
    for _ in range(6):
        b = next(it)
        assert b.pixels is None and b.moments.shape == (4, 6, 8, 8)
        assert b.moments.device.type == "cpu"
    assert enc.images == 8  # never encoded again
    for i, e in enumerate(ds.instances):  # cached in batches of 3, expected in one of 5: rounding only
        torch.testing.assert_close(e.moments[0], expected[i], **ROUNDING)


def test_flip_cache_has_two_entries_per_image(tmp_path):
    inst = make_dir(tmp_path, "inst", {"a.png": halves(64, 64, RED, BLUE),
                                       "b.png": halves(64, 64, GREEN, BLUE)})
    ds = DreamBoothDataset(cfg(inst, flip=True))
    enc = CountingEncoder()
    ds.cache_latents(enc)
    assert enc.images == 4
    for e in ds.instances:
        assert e.moments.shape == (2, 6, 8, 8)
        assert torch.allclose(e.moments[1], e.moments[0].flip(-1), atol=1e-5)
        assert not torch.allclose(e.moments[1], e.moments[0])
    it = ds.micro_batches(1, torch.Generator().manual_seed(0))
    picked = set()
    for _ in range(20):
        m = next(it).moments[0]
        picked.add(bool(m[2, 0, 0] > 0))  # blue on the left → the mirrored entry
    assert picked == {True, False}
    assert enc.images == 4


def test_augmented_set_cannot_be_cached(tmp_path):
    inst = make_dir(tmp_path, "inst", {"a.png": solid(RED)})
    ds = DreamBoothDataset(cfg(inst, augment=True))
    with pytest.raises(RuntimeError, match="cannot"):
        ds.cache_latents(CountingEncoder())


def test_cache_with_buckets_encodes_one_size_per_call(tmp_path):
    inst = make_dir(tmp_path, "inst", {"w1.png": textured(96, 48), "s1.png": textured(48, 48),
                                       "w2.png": textured(96, 48, 2), "s2.png": textured(48, 48, 3)})
    ds = DreamBoothDataset(cfg(inst, buckets=True, resolution=128))
    enc = CountingEncoder()
    ds.cache_latents(enc, batch_size=4)
    assert enc.images == 4 and len(enc.calls) == 2  # one call per size, never mixed
    b = next(ds.micro_batches(2, torch.Generator().manual_seed(0)))
    assert b.pixels is None and b.moments.shape[0] == 2


def test_progress_messages_while_loading(tmp_path):
    inst = make_dir(tmp_path, "inst", {"a.png": solid(RED), "b.png": solid(BLUE)})
    msgs = []
    DreamBoothDataset(cfg(inst), on_progress=msgs.append)
    assert any("2/2" in m for m in msgs)


def test_augmentation_window_stays_inside_the_rotated_image(tmp_path, monkeypatch):
    """Every sampling window (after rotation, scale and shift) lies inside the source image,
    so no padding is ever sampled; rotations and zooms really happen."""
    import lora_dreambooth.data.augment as augment
    thetas = []
    real = augment.F.affine_grid

    def spy(theta, *a, **k):
        thetas.append(theta.clone())
        return real(theta, *a, **k)

    monkeypatch.setattr(augment.F, "affine_grid", spy)
    inst = make_dir(tmp_path, "inst", {"sq.png": textured(64, 64), "wide.png": textured(256, 64)})
    ds = DreamBoothDataset(cfg(inst, augment=True, buckets=True, resolution=128))
    it = ds.micro_batches(1, torch.Generator().manual_seed(0))
    for _ in range(40):
        next(it)
    theta = torch.cat(thetas)
    corners = torch.tensor([[-1.0, -1, 1], [1, -1, 1], [-1, 1, 1], [1, 1, 1]]).T
    mapped = theta @ corners  # [N, 2, 4] input coordinates of the window corners
    assert mapped.abs().max() <= 1 + 1e-6
    assert (theta[:, 0, 1].abs() > 1e-3).float().mean() > 0.8  # rotated
    scales = theta[:, 0, 0].abs()  # s·cos(angle): the crop's share of the side
    assert scales.max() <= 1 and scales.min() > 0.6 and scales.mean() < 0.92
    assert scales.max() - scales.min() > 0.1  # random scale crops, not one fixed zoom


def test_hidden_files_are_ignored_silently(tmp_path):
    from lora_dreambooth.data import scan_folder
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / ".lora-train-class.json").write_text("{}")
    images, _, skipped = scan_folder(str(tmp_path))
    assert [os.path.basename(p) for p in images] == ["a.png"] and skipped == []
