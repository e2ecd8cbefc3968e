"""Image loading and preprocessing: resize, crop, normalise for BLIP-2, CLIP, SigLIP and LLaVA."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import PIL.Image
import torch
from PIL import Image, ImageOps

from blipkit.errors import ConfigError, ImageError, UsageError

__all__ = ["ImageError", "ImageInput", "ImageProcessor", "as_image_list", "load_image"]


ImageInput = str | os.PathLike | bytes | PIL.Image.Image | np.ndarray

_SINGLE_TYPES = (str, os.PathLike, bytes, bytearray, PIL.Image.Image, np.ndarray)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _item_name(item: object) -> str:
    if isinstance(item, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(item, np.ndarray):
        return "<array>"
    if isinstance(item, PIL.Image.Image):
        return "<PIL image>"
    if isinstance(item, (str, os.PathLike)):
        return str(os.fspath(item))
    return f"<{type(item).__name__}>"


def _high_depth_to_l(img: PIL.Image.Image) -> PIL.Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to 8-bit 'L'."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        # floats in [0, 1] are treated as unit range, anything else as 0..255
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        out = np.nan_to_num(arr * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        # 'I;16*' is 0..65535; 'I' (32-bit) is read as 16-bit data, which is what PNG/TIFF loaders give
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _on_white(img: PIL.Image.Image) -> PIL.Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Return a new RGB image: EXIF-rotated, transparency flattened on white, any depth scaled to 8 bit."""
    try:
        img = ImageOps.exif_transpose(img)  # always returns a new image
    except Exception:  # a broken EXIF block should not make the pixels unreadable
        img = img.copy()
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _on_white(img)
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _from_array(arr: np.ndarray) -> PIL.Image.Image:
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(
            "<array>",
            f"unsupported array shape {tuple(arr.shape)} dtype {arr.dtype}; "
            "expected uint8 (H, W), (H, W, 3) or (H, W, 4)",
        )
    if arr.size == 0:
        raise ImageError("<array>", f"empty array of shape {tuple(arr.shape)}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _decode(opener, name: str) -> PIL.Image.Image:
    """Open with ``opener()``, load all pixels and convert to RGB, mapping failures to ImageError."""
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = opener()
        except bomb as e:
            raise ImageError(name, f"image too large (decompression bomb): {e}") from e
        except Image.UnidentifiedImageError as e:
            raise ImageError(name, "not an image file") from e
        except FileNotFoundError as e:
            raise ImageError(name, "file not found") from e
        except OSError as e:
            raise ImageError(name, e.strerror or str(e) or type(e).__name__) from e
        with img:
            try:
                img.load()
            except bomb as e:
                raise ImageError(name, f"image too large (decompression bomb): {e}") from e
            except Exception as e:  # Pillow plugins raise OSError, SyntaxError, ValueError, struct.error, ...
                raise ImageError(name, f"truncated or corrupt image: {e}") from e
            try:
                return _to_rgb(img)
            except Exception as e:
                raise ImageError(name, f"cannot convert mode {img.mode!r} to RGB: {e}") from e


def load_image(item: ImageInput) -> PIL.Image.Image:
    """Return ``item`` as a fully loaded RGB PIL image; raise ImageError if it cannot be read."""
    name = _item_name(item)
    if isinstance(item, PIL.Image.Image):
        try:
            item.load()
        except Exception as e:
            raise ImageError(name, f"truncated or corrupt image: {e}") from e
        try:
            return _to_rgb(item)
        except Exception as e:
            raise ImageError(name, f"cannot convert mode {item.mode!r} to RGB: {e}") from e
    if isinstance(item, np.ndarray):
        return _to_rgb(_from_array(item))
    if isinstance(item, (bytes, bytearray)):
        if not item:
            raise ImageError(name, "empty bytes")
        data = bytes(item)
        return _decode(lambda: Image.open(io.BytesIO(data)), name)
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            if os.path.isdir(path):
                raise ImageError(name, "is a directory")
            size = os.path.getsize(path)
        except FileNotFoundError as e:
            raise ImageError(name, "file not found") from e
        except OSError as e:
            raise ImageError(name, e.strerror or str(e)) from e
        if size == 0:
            raise ImageError(name, "empty file")
        return _decode(lambda: Image.open(path), name)
    raise ImageError(name, f"unsupported input type {type(item).__name__}")


def as_image_list(images) -> list:
    """Wrap a single image input in a list; turn a list/tuple of inputs into a list."""
    if isinstance(images, _SINGLE_TYPES):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    kind = type(images).__name__
    raise TypeError(f"expected an image (path, bytes, PIL image, numpy array) or a list of them, got {kind}")


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_RESAMPLE_FROM_PIL = {int(code): name for name, code in _RESAMPLE.items()}

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)  # SigLIP's mean and std (transformers' IMAGENET_STANDARD_*)
_RESIZES = ("square", "shortest_edge")

# transformers' class defaults, used for keys missing from a preprocessor_config.json, by the class named in
# its image_processor_type / feature_extractor_type (none named: BlipImageProcessor's). "square_int": whether
# an int ``size`` means (size, size) (default_to_square=True) or the shortest edge (False).
_HF_DEFAULTS = {
    "Blip": {"size": {"height": 384, "width": 384}, "mean": _CLIP_MEAN, "std": _CLIP_STD, "square_int": True},
    "CLIP": {
        "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "mean": _CLIP_MEAN,
        "std": _CLIP_STD,
        "square_int": False,
    },
    "Siglip": {"size": {"height": 224, "width": 224}, "mean": _HALF, "std": _HALF, "square_int": False},
}
# LlavaImageProcessor: CLIP's steps, and do_pad (pad to a square of the mean colour first) is its own
_HF_DEFAULTS["Llava"] = {**_HF_DEFAULTS["CLIP"], "can_pad": True}
_HF_CLASS_SUFFIXES = ("ImageProcessor", "ImageProcessorFast", "ImageProcessorPil", "FeatureExtractor")


def _hf_defaults(d: dict) -> dict:
    """The ``_HF_DEFAULTS`` of the class a preprocessor config names; a class not listed is a ConfigError."""
    kind = d.get("image_processor_type") or d.get("feature_extractor_type") or "BlipImageProcessor"
    for prefix, defaults in _HF_DEFAULTS.items():
        if str(kind).startswith(prefix) and str(kind)[len(prefix) :] in _HF_CLASS_SUFFIXES:
            return defaults
    raise ConfigError(
        f"unsupported preprocessor config: image_processor_type {kind!r} "
        f"(known: {', '.join(p + 'ImageProcessor' for p in _HF_DEFAULTS)})"
    )


def _square_side(value, field: str) -> int:
    """An int or a square {"height", "width"} dict -> its side; otherwise a ConfigError naming ``field``."""
    if isinstance(value, dict):
        if set(value) - {"height", "width"} or "height" not in value or "width" not in value:
            raise ConfigError(f"{field} must have only 'height' and 'width', got {value!r}")
        if value["height"] != value["width"]:
            shape = f"{value['height']}x{value['width']}"
            raise ConfigError(f"only square sizes are supported, got {field} {shape}")
        value = value["height"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field} must be an int or a height/width dict, got {value!r}")
    return value


def expand_to_square(image: PIL.Image.Image, fill: tuple[int, int, int]) -> PIL.Image.Image:
    """LLaVA's ``expand2square``: the image centred on a square canvas of colour ``fill``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size`` and the aspect kept, truncated as transformers does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (size, size, C) centre crop at transformers' offsets; zero-padded if smaller."""
    height, width = arr.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + size, left : left + size]
    # transformers: pad to at least (size, size) with zeros (ceil on both sides' split), then crop
    new_h, new_w = max(size, height), max(size, width)
    pad_top, pad_left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
    padded = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = arr
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + size), max(0, left) : min(new_w, left + size)]


# fields added after the first release: left out of to_dict() at their defaults, so older dicts (and the
# feature-cache keys made from them) stay as they were
_LATER_FIELDS = {"resize": "square", "crop_size": None, "pad_to_square": False}


@dataclass
class ImageProcessor:
    """[Pad to a square,] resize, [centre crop,] scale to [0, 1] and normalise per channel.

    BLIP-2 / SigLIP: ``resize="square"``; CLIP: ``resize="shortest_edge"`` + ``crop_size``; LLaVA's
    ``image_aspect_ratio: pad``: ``pad_to_square`` before CLIP's steps. Pixel values match transformers'
    PIL-backend image processors.
    """

    image_size: int = 224  # "square": the output side; "shortest_edge": the shorter side after the resize
    mean: tuple[float, float, float] = _CLIP_MEAN
    std: tuple[float, float, float] = _CLIP_STD
    resample: str = "bicubic"
    resize: str = "square"  # "square" (S, S) or "shortest_edge" (shorter side S, aspect kept: CLIP)
    crop_size: int | None = None  # centre crop to (C, C) after the resize; needed with "shortest_edge"
    pad_to_square: bool = False  # LLaVA's expand2square: centre on a canvas of the mean colour first

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image_size must be a positive int, got {self.image_size!r}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"mean and std need 3 values each, got {self.mean!r} and {self.std!r}")
        if any(v == 0 for v in self.std):
            raise ConfigError(f"std values must be non-zero, got {self.std!r}")
        if self.resample not in _RESAMPLE:
            raise ConfigError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if self.resize not in _RESIZES:
            raise ConfigError(f"resize must be one of {list(_RESIZES)}, got {self.resize!r}")
        if self.crop_size is not None and (
            isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int) or self.crop_size < 1
        ):
            raise ConfigError(f"crop_size must be a positive int or null, got {self.crop_size!r}")
        if self.resize == "shortest_edge" and self.crop_size is None:
            raise ConfigError("resize 'shortest_edge' needs a crop_size (images of a batch must be square)")
        if not isinstance(self.pad_to_square, bool):
            raise ConfigError(f"pad_to_square must be true or false, got {self.pad_to_square!r}")

    @property
    def output_size(self) -> int:
        """The side S of the (3, S, S) tensors ``preprocess`` returns."""
        return self.image_size if self.crop_size is None else self.crop_size

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """One image -> (3, S, S) float32 tensor, S = ``output_size``; non-RGB ones via load_image."""
        if image.mode != "RGB":
            image = load_image(image)
        if self.pad_to_square:
            image = expand_to_square(image, tuple(int(x * 255) for x in self.mean))
        size = self.image_size
        if self.resize == "shortest_edge":
            target = shortest_edge_size(*image.size, size)  # (W, H)
        else:
            target = (size, size)
        resized = np.asarray(image.resize(target, resample=_RESAMPLE[self.resample]))  # (H, W, 3) uint8
        if self.crop_size is not None:
            resized = center_crop(resized, self.crop_size)
        # same arithmetic as transformers: uint8 resize, x * (1/255) in float64, then float32 normalise
        arr = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __call__(self, images) -> torch.Tensor:
        """One or many image inputs -> (B, 3, S, S) float32 tensor (S = ``output_size``)."""
        items = as_image_list(images)
        if not items:
            raise UsageError("no images given")
        return torch.stack([self.preprocess(load_image(item)) for item in items])

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the settings (``_LATER_FIELDS`` only where not at their default)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        for key, default in _LATER_FIELDS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessor:
        """Inverse of to_dict; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ImageProcessor key(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict) -> ImageProcessor:
        """Build from a transformers ``preprocessor_config.json`` dict: Blip / CLIP / Siglip ImageProcessor.

        Keys it lacks take that class's defaults; settings it cannot reproduce are a ConfigError naming them.
        """
        defaults = _hf_defaults(d)
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise ConfigError(f"unsupported preprocessor config: {flag}=false")
        pad = bool(d.get("do_pad"))
        if pad and not defaults.get("can_pad"):
            raise ConfigError("unsupported preprocessor config: do_pad=true")
        factor = d.get("rescale_factor")
        if factor is not None and abs(float(factor) - 1 / 255) > 1e-9:
            raise ConfigError(f"unsupported preprocessor config: rescale_factor={factor} (only 1/255)")

        size = d.get("size", defaults["size"])
        if isinstance(size, int) and not isinstance(size, bool) and not defaults["square_int"]:
            size = {"shortest_edge": size}  # transformers' get_size_dict(size, default_to_square=False)
        if isinstance(size, dict) and "shortest_edge" in size:
            if set(size) != {"shortest_edge"}:
                raise ConfigError(f"unsupported preprocessor config: size {size!r} (only shortest_edge)")
            resize, image_size = "shortest_edge", _square_side(size["shortest_edge"], "size.shortest_edge")
        else:
            resize, image_size = "square", _square_side(size, "size")

        crop_size = None
        if d.get("do_center_crop", defaults.get("do_center_crop", False)):
            crop = d.get("crop_size", defaults.get("crop_size"))
            if crop is None:
                raise ConfigError("unsupported preprocessor config: do_center_crop=true without a crop_size")
            crop_size = _square_side(crop, "crop_size")
        if resize == "shortest_edge" and crop_size is None:
            raise ConfigError("unsupported preprocessor config: size shortest_edge without do_center_crop")

        code = d.get("resample", int(Image.Resampling.BICUBIC))
        if code not in _RESAMPLE_FROM_PIL:
            raise ConfigError(f"unsupported resample code {code!r}; known: {_RESAMPLE_FROM_PIL}")
        return cls(
            image_size=image_size,
            mean=tuple(d.get("image_mean", defaults["mean"])),
            std=tuple(d.get("image_std", defaults["std"])),
            resample=_RESAMPLE_FROM_PIL[code],
            resize=resize,
            crop_size=crop_size,
            pad_to_square=pad,
        )
