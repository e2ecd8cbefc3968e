"""An image index: per-query ITC embeddings (N, Q, E) in safetensors plus a paths file.

Layout of an index folder::

    embeddings.safetensors   "embeddings" (N, Q, E) float32, each query vector L2-normalised
    paths.jsonl              one absolute image path per line as a JSON string, row i of the embeddings
    index.json               the model it was built with, counts and dimensions
    parts/                   batches written while building; merged into the files above at the end

A file name is data: JSON escapes newlines, U+2028 and the bytes that are not UTF-8, so no name can shift
the rows. Indexes with the older ``paths.txt`` (one plain path per line) are read too. A sample of a
webdataset shard or parquet file is named ``"<shard or parquet file>#<key>"`` (``blipkit.data.formats``).

Building streams batches to ``parts/`` as it goes, so an interrupted build resumes where it stopped and a
folder that gained images only embeds the new ones. A build holds ``<index>.lock``: one at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from blipkit.batch.lock import OutputLock
    from blipkit.data.formats import Inputs

__all__ = ["BuildResult", "ImageIndex", "build_index", "index_lock"]

EMBEDDINGS, PATHS, META, PARTS = "embeddings.safetensors", "paths.jsonl", "index.json", "parts"
OLD_PATHS = "paths.txt"


def _write_paths(target: str | os.PathLike, paths: list[str]) -> None:
    Path(target).write_text("".join(json.dumps(p, ensure_ascii=True) + "\n" for p in paths), "ascii")


def _read_paths(stem: Path) -> list[str]:
    """The paths of ``stem``.jsonl, or of ``stem``.txt written by older versions."""
    new = stem.with_suffix(".jsonl")
    if new.exists():
        with open(new, "rb") as f:
            return [json.loads(line) for line in f]
    return stem.with_suffix(".txt").read_text(encoding="utf-8").splitlines()


@dataclass
class ImageIndex:
    """Image paths and their per-query ITC embeddings."""

    paths: list[str]
    embeddings: Tensor  # (N, Q, E)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 3 or self.embeddings.shape[0] != len(self.paths):
            raise ValueError(
                f"{len(self.paths)} paths but embeddings of shape {tuple(self.embeddings.shape)}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def pooled(self) -> Tensor:
        """One vector per image (N, E): the normalised mean of its query embeddings."""
        return F.normalize(self.embeddings.mean(dim=1), dim=-1)

    @classmethod
    def load(cls, folder: str | os.PathLike, merge_parts: bool = True) -> ImageIndex:
        """Read an index folder (with any batches of an unfinished build when ``merge_parts``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_file = folder / META
        if not meta_file.exists() and not (folder / PARTS).is_dir():
            raise FileNotFoundError(f"not an index folder (no {META}): {folder}")
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        paths: list[str] = []
        chunks: list[Tensor] = []
        if (folder / EMBEDDINGS).exists():
            stored = load_file(folder / EMBEDDINGS)["embeddings"]
            if len(stored):
                chunks.append(stored)
                paths = _read_paths(folder / Path(PATHS).stem)
        for part in sorted((folder / PARTS).glob("*.safetensors")) if merge_parts else []:
            part_paths = _read_paths(part.with_suffix(""))
            chunks.append(load_file(part)["embeddings"])
            paths.extend(part_paths)
        if not chunks:
            dims = (meta.get("num_query_tokens", 1), meta.get("embed_dim", 1))
            return cls([], torch.zeros(0, *dims), meta)
        return cls(paths, torch.cat(chunks).float(), meta)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the three index files (each replaced atomically)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = self.meta | {
            "num_images": len(self),
            "num_query_tokens": int(self.embeddings.shape[1]),
            "embed_dim": int(self.embeddings.shape[2]),
        }
        _atomic(folder / EMBEDDINGS, lambda p: save_file({"embeddings": self.embeddings.contiguous()}, p))
        _atomic(folder / PATHS, lambda p: _write_paths(p, self.paths))
        (folder / OLD_PATHS).unlink(missing_ok=True)
        _atomic(folder / META, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
        self.meta = meta


def index_lock(out: str | os.PathLike) -> OutputLock:
    """The lock (``<out>.lock``, taken by ``with``) that makes a build the one writer of the index ``out``."""
    from blipkit.batch.lock import OutputLock

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return OutputLock(out)


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(str(tmp))
    os.replace(tmp, target)


@dataclass
class BuildResult:
    index: ImageIndex
    added: int
    skipped: int
    failed: list[tuple[str, str]]  # (path, reason)


def _listing(
    files: Iterable[str | os.PathLike] | Inputs,
) -> tuple[list[str], Callable[[set[str]], Iterator[tuple[str, object]]]]:
    """(the names of ``files``, each once, in order; ``images(names)``: (name, image) of those names).

    ``files`` are image paths, or the ``Inputs`` of the command line (lists, shards, parquet files, ...),
    listed without their images first, then read again for the images that are not in the index yet."""
    from blipkit.batch.files import key_of
    from blipkit.data.formats import Inputs

    if not isinstance(files, Inputs):
        names = list(dict.fromkeys(key_of(Path(f)) for f in files))
        return names, lambda todo: ((name, name) for name in names if name in todo)
    inputs = files

    def images(todo: set[str]) -> Iterator[tuple[str, object]]:
        for sample in inputs.samples():
            if sample.id in todo:
                todo.discard(sample.id)
                yield sample.id, sample.image

    return list(dict.fromkeys(s.id for s in inputs.samples(images=False))), images


def build_index(
    model,
    files: Iterable[str | os.PathLike] | Inputs,
    out: str | os.PathLike,
    model_name: str = "default",
    batch_size: int = 32,
    overwrite: bool = False,
    on_batch=None,
    lock: bool = True,
) -> BuildResult:
    """Embed ``files`` (image paths, or ``Inputs``) into the index folder ``out``, skipping images it holds.

    Unreadable images are reported in ``failed`` and tried again next time. ``on_batch(done, total)`` is
    called after every batch. The build holds ``index_lock(out)`` unless ``lock`` is False (the caller
    holds it).
    """
    from safetensors.torch import save_file

    from blipkit.batch.decode import chunks
    from blipkit.batch.files import load_listed
    from blipkit.processing import ImageError

    out = Path(out)
    with index_lock(out) if lock else nullcontext():
        if overwrite and out.exists():
            for name in (EMBEDDINGS, PATHS, OLD_PATHS, META):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / PARTS, ignore_errors=True)
        existing = ImageIndex.load(out) if (out / META).exists() or (out / PARTS).is_dir() else None
        if existing is not None and existing.meta.get("model") not in (None, model_name):
            raise ValueError(
                f"{out} was built with model {existing.meta['model']!r}, not {model_name!r}: "
                "use --overwrite to rebuild it"
            )
        done = set(existing.paths) if existing else set()
        wanted, read = _listing(files)
        todo = [f for f in wanted if f not in done]
        parts = out / PARTS
        parts.mkdir(parents=True, exist_ok=True)
        meta = {"model": model_name, "model_config": model.config.name}
        if not (out / META).exists():
            _atomic(out / META, lambda p: Path(p).write_text(json.dumps(meta) + "\n"))
        start = len(list(parts.glob("*.safetensors")))
        failed: list[tuple[str, str]] = []
        for n, chunk in enumerate(chunks(read(set(todo)), batch_size)):
            i = n * batch_size
            images, names = [], []
            for name, image in chunk:
                try:
                    images.append(load_listed(image))
                    names.append(name)
                except ImageError as e:
                    failed.append((name, e.reason))
            if images:
                emb = model.image_query_embeddings(images).cpu()  # (b, Q, E)
                stem = parts / f"{start + n:06d}"
                # paths first: a part counts only once its .safetensors exists
                _write_paths(stem.with_suffix(".jsonl"), names)
                _atomic(stem.with_suffix(".safetensors"), lambda p, e=emb: save_file({"embeddings": e}, p))
            if on_batch:
                on_batch(min(i + batch_size, len(todo)), len(todo))
        index = ImageIndex.load(out)
        index.meta |= meta
        index.save(out)
        shutil.rmtree(parts, ignore_errors=True)
        added = len(todo) - len(failed)
        return BuildResult(index, added, len(wanted) - len(todo), failed)
