"""Folder captioning: lazy file listing, worker decoding, fast batched generation, resumable writers."""

from __future__ import annotations

from blipkit.batch.files import IMAGE_EXTENSIONS, iter_images
from blipkit.batch.generate import Captioner
from blipkit.batch.writers import FORMATS, open_sink

__all__ = ["FORMATS", "IMAGE_EXTENSIONS", "Captioner", "iter_images", "open_sink"]
