"""The image processor and processor files of an exported transformers dir (``export_transformers``).

blipkit's ``ImageProcessor`` becomes the transformers PIL-backend class that computes the same pixel values
(the classes ``ImageProcessor.from_hf_dict`` reads back, plus LLaVA's for padding to a square):

    square resize                      BlipImageProcessorPil   size {height, width}
    resize + centre crop               CLIPImageProcessorPil   size {shortest_edge | height, width}, crop_size
    pad to a square, resize [+ crop]   LlavaImageProcessorPil  do_pad (background: the mean colour)

The processor beside it (``Blip2Processor`` or ``LlavaProcessor``) is what ``AutoProcessor`` loads: it puts
the image placeholder tokens in the text the way the exported model expects them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from blipkit.processing import ImageProcessor


def hf_image_processor(p: ImageProcessor) -> Any:
    """The transformers image processor (PIL backend) that gives ``p``'s pixel values."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    common = {
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": list(p.mean),
        "image_std": list(p.std),
        "resample": int(Image.Resampling[p.resample.upper()]),
    }
    side = p.image_size
    size = {"shortest_edge": side} if p.resize == "shortest_edge" else {"height": side, "width": side}
    if p.crop_size is None and not p.pad_to_square:
        return BlipImageProcessorPil(size=size, **common)
    crop = {"do_center_crop": p.crop_size is not None}
    if p.crop_size is not None:
        crop["crop_size"] = {"height": p.crop_size, "width": p.crop_size}
    if p.pad_to_square:
        return LlavaImageProcessorPil(size=size, do_pad=True, **crop, **common)
    return CLIPImageProcessorPil(size=size, **crop, **common)


def save_blip2_processor(out: Path, processor: ImageProcessor, tokenizer: Any, num_query_tokens: int) -> None:
    """``Blip2Processor`` (it prefixes ``num_query_tokens`` ``<image>`` tokens) and its image processor."""
    from transformers import Blip2Processor

    image_processor = hf_image_processor(processor)
    Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens).save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json, for loaders that read it alone


def save_llava_processor(
    out: Path,
    processor: ImageProcessor,
    tokenizer: Any,
    patch_size: int,
    select: str,
    image_token: str,
    has_cls: bool,
) -> None:
    """``LlavaProcessor`` (it repeats ``image_token`` once per image feature) and its image processor."""
    from transformers import LlavaProcessor

    image_processor = hf_image_processor(processor)
    LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=select,
        chat_template=getattr(tokenizer, "chat_template", None),
        image_token=image_token,
        num_additional_image_tokens=int(has_cls),
    ).save_pretrained(out)
    image_processor.save_pretrained(out)
