"""The training views (``blipkit.train.features.scene_view``): colour stays within its name, the background
keeps its contrast and stays off the palette, and each view is a function of (seed, image, view)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from blipkit.train.features import (
    BACKGROUND_MARGIN,
    CONTRAST,
    LABEL_MARGIN,
    LABEL_RADIUS,
    PALETTE,
    _colour_in_region,
    augmented_view,
    jittered_colour,
    nearest_colour,
    palette_distances,
    scene_view,
    shape_mask,
    to_lab,
)


def easy_vqa_like(colour: str, shape: str, background=(240, 232, 225), seed: int = 0) -> Image.Image:
    """A 64x64 scene as easy-VQA draws it: one palette-coloured shape, anti-aliased, on a light background."""
    rng = random.Random(seed)
    big = Image.new("RGB", (256, 256), background)
    draw = ImageDraw.Draw(big)
    x0, y0 = rng.randint(10, 90), rng.randint(10, 90)
    x1, y1 = x0 + rng.randint(60, 150), y0 + rng.randint(60, 150)
    fill = PALETTE[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return big.resize((64, 64), Image.Resampling.LANCZOS)  # soft edges, exact colour inside


def _dominant(view: Image.Image, background) -> np.ndarray:
    """The median colour of the pixels far from the background: the shape's colour as drawn."""
    pixels = np.asarray(view, dtype=np.float64).reshape(-1, 3)
    far = np.linalg.norm(to_lab(pixels) - to_lab(background), axis=1) > CONTRAST / 2
    inner = pixels[far]
    return np.median(inner, axis=0)


def test_palette_is_easy_vqa_and_the_examples_fall_in_their_names():
    assert PALETTE["teal"] == (0, 128, 128) and PALETTE["brown"] == (165, 42, 42) and len(PALETTE) == 8
    for name, rgb in PALETTE.items():
        assert nearest_colour(rgb) == name
    # the example scenes' colours (examples/make_examples.py)
    drawn = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (20, 180, 20), "yellow": (235, 220, 40)}
    for name, rgb in drawn.items():
        assert nearest_colour(rgb) == name


@pytest.mark.parametrize("rgb", [(220, 30, 30), (200, 0, 0), (230, 0, 30)])
def test_plain_reds_are_inside_red_training_region(rgb):
    """Views recoloured to these reds are labelled "red": they are not left in the gap beside brown."""
    d = palette_distances(rgb)
    index = list(PALETTE).index("red")
    assert d[index] + LABEL_MARGIN <= np.delete(d, index).min() and d[index] <= LABEL_RADIUS


@pytest.mark.parametrize("colour", list(PALETTE))
def test_jittered_colours_stay_in_their_name(colour):
    rng = random.Random(f"jitter/{colour}")
    d = palette_distances(np.array([jittered_colour(colour, rng) for _ in range(300)]))  # (300, 8)
    index = list(PALETTE).index(colour)
    assert (d[:, index] + LABEL_MARGIN <= np.delete(d, index, axis=1).min(axis=1)).all()
    region = np.array([_colour_in_region(index, np.random.default_rng(k)) for k in range(100)])
    d = palette_distances(region)
    assert (d[:, index] <= LABEL_RADIUS + 1e-9).all()
    assert (d[:, index] + LABEL_MARGIN <= np.delete(d, index, axis=1).min(axis=1)).all()


@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow"])
def test_jittered_colours_reach_mixed_shades(colour):
    """Channels easy-VQA leaves at 0 or 255 take values well inside the cube too: (30, 60, 220) is blue."""
    rng = random.Random(f"mixed/{colour}")
    colours = np.array([jittered_colour(colour, rng) for _ in range(400)])
    base = np.asarray(PALETTE[colour])
    pinned = colours[:, (base == 0) | (base == 255)]
    assert ((pinned > 10) & (pinned < 245)).all(axis=1).mean() > 0.1


@pytest.mark.parametrize("colour", list(PALETTE))
def test_recoloured_views_keep_their_colour_name_and_contrast(colour):
    for k, shape in enumerate(("circle", "rectangle", "triangle") * 4):
        image = easy_vqa_like(colour, shape, seed=k)
        assert shape_mask(image)[0] == colour
        view, info = scene_view(image, random.Random(f"0/{k}/{colour}"))
        assert info["label"] == colour
        d = palette_distances(info["colour"])
        assert list(PALETTE)[int(np.argmin(d))] == colour  # the colour it was given
        background = info["background"]
        assert np.linalg.norm(to_lab(background) - to_lab(info["colour"])) >= CONTRAST
        if background != tuple(np.asarray(image)[0, 0]):  # a new background stays off the palette
            assert palette_distances(background).min() >= BACKGROUND_MARGIN
        assert nearest_colour(_dominant(view, background)) == colour, (info, _dominant(view, background))


def test_views_vary_size_aspect_background_and_jpeg():
    image = easy_vqa_like("red", "circle")
    infos = [scene_view(image, random.Random(f"0/0/{v}"))[1] for v in range(40)]
    sizes = {i["size"] for i in infos}
    assert len(sizes) > 30 and all(w <= 2.05 * h and h <= 2.05 * w for w, h in sizes)
    assert any(w > 1.3 * h for w, h in sizes) and any(h > 1.3 * w for w, h in sizes)
    assert any(max(s) > 300 for s in sizes) and any(max(s) < 150 for s in sizes)
    levels = [np.mean(i["background"]) for i in infos]
    assert min(levels) < 90 and max(levels) > 200  # dark and light backgrounds
    assert 10 < sum("jpeg_quality" in i for i in infos) < 40
    assert all(50 <= i["jpeg_quality"] <= 95 for i in infos if "jpeg_quality" in i)


def test_views_are_deterministic_per_seed_image_and_view():
    image = easy_vqa_like("teal", "triangle")
    a = np.asarray(augmented_view(image, random.Random("3/7/1"), "scene"))
    b = np.asarray(augmented_view(image, random.Random("3/7/1"), "scene"))
    c = np.asarray(augmented_view(image, random.Random("3/7/2"), "scene"))
    assert np.array_equal(a, b) and (a.shape != c.shape or not np.array_equal(a, c))


def test_other_images_keep_their_colours():
    """A photo-like image (no plain background / palette shape) is only moved, scaled and maybe JPEG'd."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    assert shape_mask(photo) is None
    view, info = scene_view(photo, random.Random("0/0/1"))
    assert info["label"] is None and view.mode == "RGB"
