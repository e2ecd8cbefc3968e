"""Lazy listing of image files under the paths given on the command line.

Symbolic links are followed, each real folder at most once (a link back up the tree is not walked again).
A link with an image name that leads nowhere is listed: reading it fails with "broken symbolic link".
Other inputs (lists, shards, parquet files, imagefolder dirs) are read by ``blipkit.data.formats``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import PIL.Image


class Loader(Protocol):
    """Gives an image's bytes on demand (e.g. a shard member, ``blipkit.data.formats.TarMember``)."""

    def read(self) -> bytes: ...


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """True for names with an image extension, case-insensitive."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is(entry: os.DirEntry, test: Callable[[os.DirEntry], bool]) -> bool:
    try:
        return test(entry)
    except OSError:  # e.g. a link in a loop of links
        return False


def scan_folder(folder: str | os.PathLike) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    """(images, sub-folders) of one folder in name order; an image-named link to nowhere is an image."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)  # names only: one folder listing, never the pixels
    images, folders = [], []
    for entry in entries:
        if _is(entry, os.DirEntry.is_dir):
            folders.append(entry)
        elif is_image_name(entry.name) and (_is(entry, os.DirEntry.is_file) or entry.is_symlink()):
            images.append(entry)
    return images, folders


def _first_visit(stat: os.stat_result, seen: set[tuple[int, int]]) -> bool:
    key = (stat.st_dev, stat.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def _walk(folder: Path, recursive: bool, seen: set[tuple[int, int]]) -> Iterator[Path]:
    """Images of one folder in name order, then (with ``recursive``) its sub-folders not seen yet."""
    images, folders = scan_folder(folder)
    for entry in images:
        yield Path(entry.path)
    if recursive:
        for sub in folders:
            if _first_visit(sub.stat(), seen):
                yield from _walk(Path(sub.path), recursive, seen)


def missing_paths(paths: Iterable[str]) -> list[str]:
    """The paths that do not exist."""
    return [p for p in paths if not os.path.exists(p)]


def iter_images(
    paths: Iterable[str], recursive: bool = False, seen: set[tuple[int, int]] | None = None
) -> Iterator[Path]:
    """Image files named directly (any extension) or found in folders (by extension), lazily.

    ``seen`` holds (st_dev, st_ino) of the folders listed; pass one set to several calls to list each once.
    """
    seen = set() if seen is None else seen
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            if _first_visit(path.stat(), seen):
                yield from _walk(path, recursive, seen)
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {raw}")


def key_of(path: Path) -> str:
    """The identity of an image in outputs: its resolved absolute path (a broken link's own path)."""
    try:
        return str(path.resolve(strict=True))
    except (OSError, RuntimeError):  # missing, or a loop of links
        return str(path.parent.resolve() / path.name)


def broken_link(path: str | os.PathLike) -> str | None:
    """Why ``path`` is a symbolic link that leads to no file, or None when it is not one."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        return f"broken symbolic link to {os.readlink(path)!r}: {e.strerror}"
    return None


def load_listed(image: str | os.PathLike | bytes | Loader | None) -> PIL.Image.Image:
    """``load_image`` for a listed image: a file (a broken symbolic link is an ``ImageError`` that says so),
    the image's bytes, or a loader of ``blipkit.data.formats`` (a shard member: ``read()`` gives bytes)."""
    from blipkit.data.formats import NO_IMAGE
    from blipkit.processing import ImageError, load_image

    if image is None:
        raise ImageError("<sample>", NO_IMAGE)
    if isinstance(image, (str, os.PathLike)):
        reason = broken_link(image)
        if reason is not None:
            raise ImageError(os.fspath(image), reason)
        return load_image(image)
    return load_image(image if isinstance(image, (bytes, bytearray)) else image.read())
