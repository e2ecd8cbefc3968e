"""Tests for blipkit.processing: image loading and preprocessing."""

from __future__ import annotations

import io
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from blipkit.processing import ImageError, ImageProcessor, as_image_list, load_image


def _rgb(w: int = 40, h: int = 20, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_bytes(img: PIL.Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _assert_rgb(img: PIL.Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(img, PIL.Image.Image)
    assert img.mode == "RGB"
    assert img.size == size


# ---------------------------------------------------------------- loading: good inputs


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    _rgb(40, 20).save(path, exif=exif.tobytes())
    _assert_rgb(load_image(path), (20, 40))
    _assert_rgb(load_image(str(path)), (20, 40))


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    arr = np.zeros((4, 5, 4), dtype=np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 255
    arr[1, 2] = (10, 20, 30, 0)
    path = tmp_path / "alpha.png"
    Image.fromarray(arr).save(path)
    img = load_image(path)
    _assert_rgb(img, (5, 4))
    assert img.getpixel((2, 1)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (200, 0, 0)


def test_la_half_alpha_composited_on_white():
    arr = np.zeros((2, 2, 2), dtype=np.uint8)
    arr[..., 1] = 128  # black at ~50% opacity over white -> mid grey
    img = load_image(Image.frombytes("LA", (2, 2), arr.tobytes()))
    assert abs(img.getpixel((0, 0))[0] - 127) <= 1


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (3, 2), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    img = load_image(path)
    _assert_rgb(img, (3, 2))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("mode", "fmt", "value", "expected"),
    [
        ("L", "png", 77, (77, 77, 77)),
        ("1", "png", 1, (255, 255, 255)),
        ("P", "png", 0, (0, 0, 0)),
        ("CMYK", "jpeg", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_modes_converted_to_rgb(tmp_path, mode, fmt, value, expected):
    path = tmp_path / f"img_{mode}.{fmt}"
    Image.new(mode, (6, 4), value).save(path)
    img = load_image(path)
    _assert_rgb(img, (6, 4))
    got = img.getpixel((2, 2))
    assert all(abs(a - b) <= 2 for a, b in zip(got, expected, strict=True)), got  # jpeg is lossy


def test_16bit_png_scaled_to_8bit(tmp_path):
    arr = np.array([[0, 257 * 100], [65535, 257 * 3 + 100]], dtype=np.uint16)
    src = Image.fromarray(arr)
    assert src.mode == "I;16"
    path = tmp_path / "deep.png"
    src.save(path)
    img = load_image(path)
    _assert_rgb(img, (2, 2))
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((1, 0)) == (100, 100, 100)
    assert img.getpixel((0, 1)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (3, 3, 3)


def test_32bit_int_and_float_modes():
    i32 = Image.fromarray(np.full((2, 2), 257 * 40, dtype=np.int32))
    assert i32.mode == "I"
    assert load_image(i32).getpixel((0, 0)) == (40, 40, 40)
    f32 = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert f32.mode == "F"
    assert load_image(f32).getpixel((0, 0)) == (128, 128, 128)


def test_one_pixel(tmp_path):
    path = tmp_path / "px.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    img = load_image(path)
    _assert_rgb(img, (1, 1))
    assert img.getpixel((0, 0)) == (1, 2, 3)
    assert ImageProcessor(image_size=8)(path).shape == (1, 3, 8, 8)


def test_numpy_inputs():
    hw3 = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    img = load_image(hw3)
    _assert_rgb(img, (5, 4))
    assert np.array_equal(np.asarray(img), hw3)
    hw = np.full((4, 5), 9, dtype=np.uint8)
    assert np.asarray(load_image(hw))[0, 0].tolist() == [9, 9, 9]
    hw4 = np.zeros((2, 2, 4), dtype=np.uint8)
    assert load_image(hw4).getpixel((0, 0)) == (255, 255, 255)


def test_bytes_and_pil_inputs():
    src = _rgb(7, 3)
    from_bytes = load_image(_png_bytes(src))
    _assert_rgb(from_bytes, (7, 3))
    assert np.array_equal(np.asarray(from_bytes), np.asarray(src))
    from_pil = load_image(src)
    _assert_rgb(from_pil, (7, 3))
    assert from_pil is not src


# ---------------------------------------------------------------- loading: errors


def _expect_error(item, name: str, reason_part: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(item)
    msg = str(info.value)
    assert name in msg and name in info.value.item
    assert reason_part in msg
    assert msg.startswith("cannot read image '")
    return info.value


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.png", "nope.png", "file not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _expect_error(path, "empty.jpg", "empty file")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("definitely not pixels\n")
    _expect_error(path, "x.png", "not an image file")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    _rgb(64, 64).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, f"cut.{fmt}", "truncated or corrupt image")


# 100x100 is over 2x the limit (Pillow error); 40x40 is over the limit (Pillow warning, made an error)
@pytest.mark.parametrize("side", [100, 40])
def test_decompression_bomb(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    _expect_error(path, "bomb.png", "image too large (decompression bomb)")


def test_bad_numpy_arrays():
    err = _expect_error(np.zeros((4, 4, 3), dtype=np.float32), "<array>", "float32")
    assert "(4, 4, 3)" in str(err)
    _expect_error(np.zeros((2, 4, 4, 3), dtype=np.uint8), "<array>", "(2, 4, 4, 3)")
    _expect_error(np.zeros((4, 4, 2), dtype=np.uint8), "<array>", "(4, 4, 2)")


def test_bad_bytes_and_type():
    _expect_error(b"", "<bytes>", "empty")
    _expect_error(b"GIF89a-but-not-really", "<bytes>", "not an image file")
    _expect_error(12345, "<int>", "unsupported input type")


def test_image_error_is_value_error_and_pickles():
    err = ImageError("a/b.png", "truncated file")
    assert isinstance(err, ValueError)
    assert str(err) == "cannot read image 'a/b.png': truncated file"
    back = pickle.loads(pickle.dumps(err))
    assert (back.item, back.reason, str(back)) == (err.item, err.reason, str(err))


def test_as_image_list():
    arr = np.zeros((2, 2, 3), dtype=np.uint8)
    pil = Image.new("RGB", (1, 1))
    assert as_image_list("a.png") == ["a.png"]
    assert as_image_list(b"xy") == [b"xy"]
    assert as_image_list(arr)[0] is arr
    assert as_image_list(pil) == [pil]
    assert as_image_list(("a", "b")) == ["a", "b"]
    assert as_image_list([]) == []
    with pytest.raises(TypeError):
        as_image_list(42)


# ---------------------------------------------------------------- ImageProcessor


def test_preprocess_values_by_hand():
    proc = ImageProcessor(image_size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0), resample="nearest")
    img = Image.new("RGB", (8, 8), (255, 0, 51))
    out = proc.preprocess(img)
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.full((4, 4), 1.0))
    assert torch.allclose(out[1], torch.full((4, 4), -2.0))
    assert torch.allclose(out[2], torch.full((4, 4), 0.2 - 0.5))


def test_call_batches_mixed_inputs(tmp_path):
    path = tmp_path / "a.png"
    _rgb(10, 6).save(path)
    proc = ImageProcessor(image_size=16)
    batch = proc([path, _rgb(5, 9), np.zeros((3, 3), dtype=np.uint8), _png_bytes(_rgb(4, 4))])
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert proc(_rgb()).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="no images"):
        proc([])
    with pytest.raises(ImageError, match="missing.png"):
        proc([path, tmp_path / "missing.png"])


def test_preprocess_non_rgb_goes_through_load_image():
    proc = ImageProcessor(image_size=2, mean=(0, 0, 0), std=(1, 1, 1))
    out = proc.preprocess(Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    assert torch.allclose(out, torch.ones(3, 2, 2))


def test_dict_round_trip_and_validation():
    proc = ImageProcessor(image_size=364, resample="bilinear")
    d = proc.to_dict()
    assert d == {"image_size": 364, "mean": list(proc.mean), "std": list(proc.std), "resample": "bilinear"}
    assert ImageProcessor.from_dict(d) == proc
    with pytest.raises(ValueError, match="crop_ratio"):
        ImageProcessor.from_dict({**d, "crop_ratio": 3})
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor(resample="box")
    with pytest.raises(ValueError, match="image_size"):
        ImageProcessor(image_size=0)
    with pytest.raises(ValueError, match="mean"):
        ImageProcessor(mean=(0.5, 0.5))


def test_from_hf_dict():
    cfg = {
        "do_normalize": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "Blip2Processor",
        "resample": 3,
        "size": {"height": 224, "width": 224},
    }
    proc = ImageProcessor.from_hf_dict(cfg)
    assert proc == ImageProcessor()
    assert ImageProcessor.from_hf_dict({**cfg, "size": 32, "resample": 2}).resample == "bilinear"
    assert ImageProcessor.from_hf_dict({**cfg, "resample": 0}).resample == "nearest"
    assert ImageProcessor.from_hf_dict({**cfg, "resample": 1}).resample == "lanczos"
    assert ImageProcessor.from_hf_dict({}).image_size == 384  # transformers' BLIP default
    with pytest.raises(ValueError, match="square"):
        ImageProcessor.from_hf_dict({**cfg, "size": {"height": 224, "width": 256}})
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor.from_hf_dict({**cfg, "resample": 4})
    with pytest.raises(ValueError, match="do_normalize"):
        ImageProcessor.from_hf_dict({**cfg, "do_normalize": False})


def _hf_pil_processor_class():
    transformers = pytest.importorskip("transformers")
    # the PIL backend: it is what BlipImageProcessor falls back to without torchvision
    return getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_parity_with_transformers_blip_image_processor(resample):
    cls = _hf_pil_processor_class()
    codes = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
    hf = cls(
        size={"height": 30, "width": 30},
        resample=codes[resample],
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    ours = ImageProcessor.from_hf_dict(hf.to_dict())
    assert ours.image_size == 30 and ours.resample == resample
    images = [_rgb(47, 23, seed=1), _rgb(13, 61, seed=2), _rgb(30, 30, seed=3)]
    expected = hf(images, return_tensors="np")["pixel_values"]
    got = ours(images).numpy()
    assert got.shape == expected.shape == (3, 3, 30, 30)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- CLIP / SigLIP / LLaVA preprocessing


def _hf_pil(name: str):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, f"{name}ImageProcessorPil")


_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
# non-square (both orientations), square, and one smaller than the crop on one side
_SHAPES = [(47, 23), (13, 61), (30, 30), (90, 31), (31, 90), (8, 40)]


def _images() -> list[PIL.Image.Image]:
    return [_rgb(w, h, seed=i) for i, (w, h) in enumerate(_SHAPES)]


@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("shortest_edge", "crop"), [(30, 30), (32, 24), (20, 24)])
def test_parity_with_transformers_clip_image_processor(resample, shortest_edge, crop):
    # (20, 24): the crop is larger than the resized short side, so transformers zero-pads before cropping
    hf = _hf_pil("CLIP")(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": crop, "width": crop},
        resample=_CODES[resample],
    )
    ours = ImageProcessor.from_hf_dict(hf.to_dict())
    assert (ours.resize, ours.image_size, ours.crop_size, ours.resample) == (
        "shortest_edge",
        shortest_edge,
        crop,
        resample,
    )
    assert ours.output_size == crop
    for image in _images():  # one at a time: transformers only batches equal output sizes anyway
        expected = hf(image, return_tensors="np")["pixel_values"]
        got = ours(image).numpy()
        assert got.shape == expected.shape == (1, 3, crop, crop)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_parity_with_transformers_siglip_image_processor():
    hf = _hf_pil("Siglip")(size={"height": 30, "width": 30})
    ours = ImageProcessor.from_hf_dict(hf.to_dict())
    assert (ours.resize, ours.image_size, ours.crop_size, ours.mean, ours.std) == (
        "square",
        30,
        None,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
    )
    images = _images()
    expected = hf(images, return_tensors="np")["pixel_values"]
    got = ours(images).numpy()
    assert got.shape == expected.shape == (len(images), 3, 30, 30)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def _llava_expand2square(pil_img, background_color):
    """LLaVA's ``llava/mm_utils.py::expand2square``, verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def test_pad_to_square_matches_llava():
    hf = _hf_pil("CLIP")(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    ours = ImageProcessor(**{**ImageProcessor.from_hf_dict(hf.to_dict()).__dict__, "pad_to_square": True})
    fill = tuple(int(x * 255) for x in hf.image_mean)
    for image in _images():
        expected = hf(_llava_expand2square(image, fill), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours(image).numpy(), expected, rtol=0, atol=1e-6)
    # the padding is visible: a wide image's top row is the mean colour (truncated to uint8), ~0 normalised
    wide = ours(_rgb(60, 20, seed=9))[0]
    assert wide[:, 0].abs().max() < 0.02
    assert not torch.allclose(wide, ImageProcessor.from_hf_dict(hf.to_dict())(_rgb(60, 20, seed=9))[0])


def test_new_fields_round_trip_and_stay_out_of_old_dicts():
    old = ImageProcessor(image_size=30).to_dict()
    assert set(old) == {"image_size", "mean", "std", "resample"}  # feature-cache keys unchanged
    clip = ImageProcessor(image_size=32, resize="shortest_edge", crop_size=28, pad_to_square=True)
    d = clip.to_dict()
    assert (d["resize"], d["crop_size"], d["pad_to_square"]) == ("shortest_edge", 28, True)
    assert ImageProcessor.from_dict(d) == clip
    assert ImageProcessor.from_dict(old) == ImageProcessor(image_size=30)
    square_crop = ImageProcessor(image_size=36, crop_size=30)
    assert ImageProcessor.from_dict(square_crop.to_dict()) == square_crop
    assert square_crop(_rgb(50, 20)).shape == (1, 3, 30, 30)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resize": "longest_edge"}, "resize"),
        ({"crop_size": 0}, "crop_size"),
        ({"crop_size": True}, "crop_size"),
        ({"resize": "shortest_edge"}, "crop_size"),
        ({"pad_to_square": 1}, "pad_to_square"),
    ],
)
def test_new_fields_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImageProcessor(**kwargs)


_CLIP_HF = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "CLIPImageProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}


def test_from_hf_dict_clip_and_siglip_forms():
    clip = ImageProcessor(image_size=224, resize="shortest_edge", crop_size=224)
    assert ImageProcessor.from_hf_dict(_CLIP_HF) == clip
    # openai/clip-vit-*: the old feature-extractor form, int sizes (CLIP's int size is the shortest edge)
    old = {**_CLIP_HF, "size": 224, "crop_size": 224, "feature_extractor_type": "CLIPFeatureExtractor"}
    del old["image_processor_type"]
    assert ImageProcessor.from_hf_dict(old) == clip
    # keys left out take CLIPImageProcessor's defaults (do_center_crop true, crop 224)
    assert ImageProcessor.from_hf_dict({"image_processor_type": "CLIPImageProcessor"}) == clip
    siglip = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}}
    got = ImageProcessor.from_hf_dict(siglip)
    assert got == ImageProcessor(image_size=384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert ImageProcessor.from_hf_dict({**_CLIP_HF, "image_processor_type": "CLIPImageProcessorFast"}) == clip


def test_from_hf_dict_llava_pads_to_a_square_of_the_mean_colour():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    d = {**_CLIP_HF, "image_processor_type": "LlavaImageProcessor", "do_pad": True}
    got = ImageProcessor.from_hf_dict(d)
    assert got == ImageProcessor(image_size=224, resize="shortest_edge", crop_size=224, pad_to_square=True)
    assert ImageProcessor.from_hf_dict({**d, "do_pad": False}).pad_to_square is False
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 200, 3), dtype=np.uint8))
    ref = LlavaImageProcessorPil(do_pad=True)(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got.preprocess(image), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"do_center_crop": False}, "do_center_crop"),  # shortest edge alone: non-square outputs
        ({"size": {"shortest_edge": 224, "longest_edge": 448}}, "longest_edge"),
        ({"crop_size": {"height": 224, "width": 200}}, "crop_size"),
        ({"size": {"shortest_edge": "224"}}, "size.shortest_edge"),
        ({"do_pad": True}, "do_pad"),
        ({"image_processor_type": "LlavaNextImageProcessor"}, "LlavaNextImageProcessor"),
        ({"crop_size": None}, "crop_size"),
    ],
)
def test_from_hf_dict_rejects_what_it_cannot_reproduce(change, named):
    with pytest.raises(ValueError, match=named):
        ImageProcessor.from_hf_dict({**_CLIP_HF, **change})
