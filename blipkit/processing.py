"""Image loading and BLIP-2 resize/normalise preprocessing (the text side is ``blipkit.text``)."""

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

# defaults of transformers' BlipImageProcessor, used for keys missing from a preprocessor_config.json
_HF_DEFAULT_SIZE = 384
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessor:
    """Resize to a square, scale to [0, 1] and normalise per channel (BLIP-2 / CLIP statistics)."""

    image_size: int = 224
    mean: tuple[float, float, float] = _CLIP_MEAN
    std: tuple[float, float, float] = _CLIP_STD
    resample: str = "bicubic"

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

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """One image -> (3, S, S) float32 tensor; non-RGB images go through load_image first."""
        if image.mode != "RGB":
            image = load_image(image)
        size = self.image_size
        resized = image.resize((size, size), resample=_RESAMPLE[self.resample])
        # same arithmetic as transformers: uint8 resize, x * (1/255) in float64, then float32 normalise
        arr = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __call__(self, images) -> torch.Tensor:
        """One or many image inputs -> (B, 3, S, S) float32 tensor."""
        items = as_image_list(images)
        if not items:
            raise UsageError("no images given")
        return torch.stack([self.preprocess(load_image(item)) for item in items])

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the settings."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
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
        """Build from a transformers BlipImageProcessor ``preprocessor_config.json`` dict."""
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise ConfigError(f"unsupported preprocessor config: {flag}=false")
        if d.get("do_center_crop"):
            raise ConfigError("unsupported preprocessor config: do_center_crop=true")
        factor = d.get("rescale_factor")
        if factor is not None and abs(float(factor) - 1 / 255) > 1e-9:
            raise ConfigError(f"unsupported preprocessor config: rescale_factor={factor} (only 1/255)")

        size = d.get("size", _HF_DEFAULT_SIZE)
        if isinstance(size, dict):
            if "height" not in size or "width" not in size:
                raise ConfigError(f"size must have 'height' and 'width', got {size!r}")
            if size["height"] != size["width"]:
                raise ConfigError(f"only square sizes are supported, got {size['height']}x{size['width']}")
            size = size["height"]
        if isinstance(size, bool) or not isinstance(size, int):
            raise ConfigError(f"size must be an int or a height/width dict, got {size!r}")

        code = d.get("resample", int(Image.Resampling.BICUBIC))
        if code not in _RESAMPLE_FROM_PIL:
            raise ConfigError(f"unsupported resample code {code!r}; known: {_RESAMPLE_FROM_PIL}")
        return cls(
            image_size=size,
            mean=tuple(d.get("image_mean", _CLIP_MEAN)),
            std=tuple(d.get("image_std", _CLIP_STD)),
            resample=_RESAMPLE_FROM_PIL[code],
        )
