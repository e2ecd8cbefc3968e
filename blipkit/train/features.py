"""Frozen image-encoder features, computed once per (encoder, image size, image list, views) and cached.

View 0 is the image as the processor sees it at inference. Views 1.. are augmented copies: the image is
shrunk, placed at a random spot on a larger canvas of its background colour and maybe mirrored, so the
bridge learns shapes at other sizes and positions. Features are stored as one fp16 array (N, V, P, Dv).
"""

from __future__ import annotations

import hashlib
import json
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
INDEX_FILE = "images.json"


def augmented_view(image: Image.Image, rng: random.Random) -> Image.Image:
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


def cache_key(images: list[str], processor: ImageProcessor, encoder_name: str, views: int, seed: int) -> str:
    blob = json.dumps([encoder_name, processor.to_dict(), views, seed, images])
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
                image = augmented_view(image, random.Random(f"{seed}/{i}/{v}"))
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
) -> np.ndarray:
    """Features (N, V, P, Dv) fp16 (memory-mapped) for ``images``; the main process computes missing ones
    with the encoder ``make_encoder()`` builds, while the others wait at ``barrier``."""
    folder = cache_root / cache_key(images, processor, encoder_name, views, seed)
    file = folder / FEATURES_FILE
    if is_main and not file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INDEX_FILE).write_text(json.dumps({"encoder": encoder_name, "images": images}))
        start = time.perf_counter()
        compute_features(make_encoder(), images, processor, file, views, seed)
        print(f"cached {len(images)} x {views} image features in {time.perf_counter() - start:.0f} s: {file}")
    barrier()
    return np.load(file, mmap_mode="r")
