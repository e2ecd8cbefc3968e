"""Frozen image-encoder features, computed once per (encoder, image size, image list, views) and cached.

View 0 is the image as the processor sees it at inference. Views 1.. are augmented copies (``scene_view``),
so the bridge learns colour and shape apart from how a scene is drawn: a one-shape image in a palette colour
on a plain background (easy-VQA's kind) gets its shape recoloured within its colour name (CIELAB, with a
margin from the next colour; a soft alpha from the original keeps anti-aliased edges), a new light, mid or
dark background (far from the shape and from every palette colour), a new scale and place on a canvas of
another size and aspect ratio, maybe a mirror and maybe JPEG re-encoding at quality 50-95. Other images are
shrunk and placed on a canvas of their corner colour (and maybe JPEG re-encoded). Each view is deterministic
per (seed, image, view). Features are stored as one fp16 array (N, V, P, Dv).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from blipkit.processing import ImageProcessor, load_image

FEATURES_FILE = "features.npy"
AUGMENT_VERSION = 4  # part of the cache key: views made by an older augmentation are not reused
INDEX_FILE = "images.json"


PALETTE = {  # easy-VQA's shape colours, exact
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
LABEL_MARGIN = 4.0  # a recoloured shape is this much (CIELAB) nearer its label's colour than any other;
# small, so plain reds such as (220, 30, 30) and (200, 0, 0), 7.5-10 nearer red than brown, are named "red"
LABEL_RADIUS = 50.0  # and at most this far (CIELAB) from it: the part of the name's region users draw
CONTRAST = 40.0  # least CIELAB distance between a new background and the shape
BACKGROUND_MARGIN = 12.0  # least CIELAB distance between a new background and any palette colour


def to_lab(rgb) -> np.ndarray:
    """sRGB (..., 3) in 0-255 -> CIELAB (D65), for colour distances that follow what a colour name covers."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_LAB = to_lab(list(PALETTE.values()))  # (8, 3)


def palette_distances(rgb) -> np.ndarray:
    """CIELAB distance of colour(s) (..., 3) to each palette colour: (..., 8) in ``PALETTE`` order."""
    return np.linalg.norm(to_lab(rgb)[..., None, :] - _PALETTE_LAB, axis=-1)


def nearest_colour(rgb) -> str:
    """The palette name nearest to one colour (CIELAB)."""
    return list(PALETTE)[int(np.argmin(palette_distances(rgb)))]


def _colour_distance(a, b) -> float:
    return float(np.linalg.norm(to_lab(a) - to_lab(b)))


def shape_mask(image: Image.Image) -> tuple[str, tuple[int, int, int], np.ndarray] | None:
    """(colour name, background, soft alpha (H, W) in 0..1) of a one-shape image in a palette colour on a
    plain background (easy-VQA's kind), or None for anything else (those get geometric changes only)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    corners = a[[0, 0, -1, -1], [0, -1, 0, -1]]
    if np.abs(corners - corners[0]).max() > 2:
        return None
    background = a[0, 0]
    flat = a.reshape(-1, 3)
    best = None
    for name, rgb in PALETTE.items():
        count = int((np.abs(flat - rgb).max(axis=1) <= 2).sum())
        if count >= 20 and (best is None or count > best[1]) and np.abs(background - rgb).max() > 40:
            best = (name, count)
    if best is None:
        return None
    colour = np.asarray(PALETTE[best[0]], dtype=np.float64)
    axis = colour - background
    alpha = np.clip(((a - background) @ axis) / (axis @ axis), 0.0, 1.0)  # anti-aliased edges stay soft
    return best[0], tuple(int(x) for x in background), alpha


def jittered_colour(label: str, rng: random.Random, spread: int = 70) -> tuple[int, int, int]:
    """A random colour whose nearest palette colour is ``label``'s, by at least ``LABEL_MARGIN``: half the
    time near the palette colour (scaled and shifted per channel), half the time uniform over the RGB
    colours within ``LABEL_RADIUS`` of it (per-channel shifts clipped at 0 or 255 rarely reach mixed
    shades such as (30, 60, 220), which are plainly blue)."""
    base = PALETTE[label]
    index = list(PALETTE).index(label)
    if rng.random() < 0.5:
        return _colour_in_region(index, np.random.default_rng(rng.getrandbits(32))) or base
    for _ in range(100):
        scale = rng.uniform(0.8, 1.05)
        c = tuple(int(min(255, max(0, round(v * scale + rng.uniform(-spread, spread))))) for v in base)
        d = palette_distances(c)
        if d[index] + LABEL_MARGIN <= np.delete(d, index).min():
            return c
    return base


def _colour_in_region(index: int, gen: np.random.Generator) -> tuple[int, int, int] | None:
    """A colour drawn uniformly from the RGB cube among those named palette colour ``index`` (by
    ``LABEL_MARGIN``) and within ``LABEL_RADIUS`` of it; None if 16 rounds of candidates find none."""
    for _ in range(16):
        c = gen.integers(0, 256, (4096, 3))
        d = palette_distances(c)  # (4096, 8)
        others = np.delete(d, index, axis=1).min(axis=1)
        ok = np.flatnonzero((d[:, index] + LABEL_MARGIN <= others) & (d[:, index] <= LABEL_RADIUS))
        if ok.size:
            return tuple(int(x) for x in c[ok[0]])
    return None


def random_background(shape: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    """A plain background, light, mid or dark, far from the shape colour and from every palette colour."""
    for _ in range(200):
        level = rng.uniform(15, 255)
        tint = rng.uniform(0, 40)
        c = tuple(int(min(255, max(0, round(level + rng.uniform(-tint, tint))))) for _ in range(3))
        if _colour_distance(c, shape) >= CONTRAST and palette_distances(c).min() >= BACKGROUND_MARGIN:
            return c
    return (235, 235, 235) if _colour_distance((235, 235, 235), shape) >= CONTRAST else (40, 40, 60)


def scene_view(image: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    """An augmented view and what was done: the shape recoloured within its colour name, on a new
    background, scaled and placed anywhere on a canvas of another size and aspect ratio, maybe mirrored,
    maybe JPEG re-encoded. Images that are not one palette-coloured shape on a plain background keep their
    colours (shrunk and placed on a canvas of their corner colour)."""
    found = shape_mask(image)
    info: dict = {"label": None}
    if found is None:
        view = augmented_geometry(image, rng)
    else:
        label, background, alpha = found
        colour = PALETTE[label] if rng.random() < 0.2 else jittered_colour(label, rng)
        bg = background if rng.random() < 0.25 else random_background(colour, rng)
        if _colour_distance(bg, colour) < CONTRAST:
            bg = random_background(colour, rng)
        view = _compose(alpha, colour, bg, rng)
        info = {"label": label, "colour": colour, "background": bg}
    if rng.random() < 0.7:
        quality = rng.randint(50, 95)
        buffer = io.BytesIO()
        view.save(buffer, format="JPEG", quality=quality)
        view = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        info["jpeg_quality"] = quality
    info["size"] = view.size
    return view, info


def _compose(alpha: np.ndarray, colour, background, rng: random.Random) -> Image.Image:
    """The shape's alpha cut to its box, scaled (edges kept about a pixel wide), placed on a new canvas."""
    ys, xs = np.nonzero(alpha > 0.02)
    crop = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    long_side = rng.uniform(96, 400)
    ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
    width, height = (long_side, long_side / ratio) if ratio >= 1 else (long_side * ratio, long_side)
    width, height = max(32, round(width)), max(32, round(height))
    h, w = crop.shape
    fraction = rng.uniform(0.15, 0.9)  # the shape's longer side, of the canvas's shorter side
    scale = fraction * min(width, height) / max(h, w)
    new_w, new_h = max(4, round(w * scale)), max(4, round(h * scale))
    mask = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32))
    mask = np.asarray(mask.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float64)
    if scale > 1:  # sharpen an enlarged edge back to about one pixel
        mask = (mask - 0.5) * scale + 0.5
    mask = np.clip(mask, 0.0, 1.0)
    x = rng.randint(0, width - new_w)
    y = rng.randint(0, height - new_h)
    full = np.zeros((height, width))
    full[y : y + new_h, x : x + new_w] = mask
    rgb = full[..., None] * np.asarray(colour, float) + (1 - full[..., None]) * np.asarray(background, float)
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def augmented_geometry(image: Image.Image, rng: random.Random) -> Image.Image:
    """Shrink into a canvas 1-2.5x the image size (background colour), place anywhere, maybe mirror."""
    w, h = image.size
    canvas_side = int(max(w, h) * rng.uniform(1.0, 2.5))
    scale = rng.uniform(0.35, 1.0) * canvas_side / max(w, h)
    small = image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (canvas_side, canvas_side), image.getpixel((0, 0)))
    x = rng.randint(0, max(0, canvas_side - small.width))
    y = rng.randint(0, max(0, canvas_side - small.height))
    canvas.paste(small, (x, y))
    return ImageOps.mirror(canvas) if rng.random() < 0.5 else canvas


AUGMENTS = ("geometry", "scene")  # what views 1.. change: size/place/mirror, or also colour/background/JPEG


def augmented_view(image: Image.Image, rng: random.Random, augment: str = "scene") -> Image.Image:
    """One augmented view of ``image``: ``augment_geometry`` or ``scene_view``."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")
    return augmented_geometry(image, rng) if augment == "geometry" else scene_view(image, rng)[0]


def cache_key(
    images: list[str], processor: ImageProcessor, encoder_name: str, views: int, seed: int, augment: str
) -> str:
    scene = [augment, AUGMENT_VERSION] if augment != "geometry" else []  # geometry views: the original key
    blob = json.dumps([encoder_name, processor.to_dict(), views, seed, images, *scene])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def compute_features(
    encoder: nn.Module,
    images: list[str],
    processor: ImageProcessor,
    out_file: Path,
    views: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    augment: str = "geometry",
) -> np.ndarray:
    """Run the frozen encoder over every (image, view); write (N, V, P, Dv) fp16 to ``out_file``."""
    from tqdm.auto import tqdm

    jobs = [(i, v) for i in range(len(images)) for v in range(views)]
    tmp = out_file.with_suffix(f".tmp{os.getpid()}.npy")
    array = None
    bar = tqdm(total=len(jobs), desc="image features", unit="img", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        pixels = []
        for i, v in chunk:
            image = load_image(images[i])
            if v:
                image = augmented_view(image, random.Random(f"{seed}/{i}/{v}"), augment)
            pixels.append(processor.preprocess(image))
        feats = encoder(torch.stack(pixels)).float().numpy().astype(np.float16)  # (b, P, Dv)
        if array is None:
            shape = (len(images), views, *feats.shape[1:])
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        for (i, v), f in zip(chunk, feats, strict=True):
            array[i, v] = f
        bar.update(len(chunk))
    bar.close()
    array.flush()
    del array
    os.replace(tmp, out_file)
    return np.load(out_file, mmap_mode="r")


def cached_features(
    make_encoder: Callable[[], nn.Module],
    images: list[str],
    processor: ImageProcessor,
    cache_root: Path,
    encoder_name: str,
    views: int = 1,
    seed: int = 0,
    is_main: bool = True,
    barrier=lambda: None,
    augment: str = "geometry",
) -> np.ndarray:
    """Features (N, V, P, Dv) fp16 (memory-mapped) for ``images``; the main process computes missing ones
    with the encoder ``make_encoder()`` builds, while the others wait at ``barrier``."""
    folder = cache_root / cache_key(images, processor, encoder_name, views, seed, augment)
    file = folder / FEATURES_FILE
    if is_main and not file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INDEX_FILE).write_text(json.dumps({"encoder": encoder_name, "images": images}))
        start = time.perf_counter()
        compute_features(make_encoder(), images, processor, file, views, seed, augment=augment)
        print(f"cached {len(images)} x {views} image features in {time.perf_counter() - start:.0f} s: {file}")
    barrier()
    return np.load(file, mmap_mode="r")
