"""Lazy listing of image files under the paths given on the command line."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """True for names with an image extension, case-insensitive."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    """Images of one folder in name order, then (with ``recursive``) its sub-folders, one at a time."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)  # names only: one folder listing, never the pixels
    subfolders = []
    for entry in entries:
        if entry.is_dir():
            subfolders.append(entry.path)
        elif entry.is_file() and is_image_name(entry.name):
            yield Path(entry.path)
    if recursive:
        for sub in subfolders:
            yield from _walk(Path(sub), recursive)


def missing_paths(paths: Iterable[str]) -> list[str]:
    """The paths that do not exist."""
    return [p for p in paths if not os.path.exists(p)]


def iter_images(paths: Iterable[str], recursive: bool = False) -> Iterator[Path]:
    """Image files named directly (any extension) or found in folders (by extension), lazily."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _walk(path, recursive)
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {raw}")


def key_of(path: Path) -> str:
    """The identity of an image in outputs: its resolved absolute path."""
    return str(path.resolve())
