"""Image folders for the captioning tests (good images of every mode, every kind of unreadable file, odd
names), running ``blipkit caption`` and reading its outputs."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from blipkit import cli

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max-new-tokens", "4", "--batch-size", "4", "--workers", "0", "--threads", "1"]

GOOD = {  # name -> how it is made: every one of these must be captioned
    "rgb.png": lambda rng: Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),
    "cmyk.jpg": lambda rng: Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "CMYK"),
    "deep16.png": lambda rng: Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)),
    "rgba.png": lambda rng: Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA"),
    "palette.gif": lambda rng: Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).quantize(16),
    "pixel.png": lambda rng: Image.new("RGB", (1, 1), (200, 10, 10)),
    "gray.JPEG": lambda rng: Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)),
    "photo.webp": lambda rng: Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)),
    "scan.TIF": lambda rng: Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)),
    "old.bmp": lambda rng: Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)),
}
ODD_NAMES = [  # file names that break naive text formats
    "new\nline.png",
    "tab\there.png",
    "quo\"te's.png",
    "com,ma.png",
    "line\u2028sep.png",
    os.fsdecode(b"bad\xff.png"),  # not UTF-8
]
BAD = {  # name -> the words its error reason must contain
    "empty.png": "empty file",
    "truncated.jpg": "truncated",
    "text.jpg": "not an image",
    "bomb.png": "decompression bomb",
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20000) -> bytes:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels: beyond Pillow's decompression-bomb limit."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + (_png_chunk(b"IEND", b""))
    )


def make_bad(folder: Path) -> None:
    (folder / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "text.jpg").write_text("this is not a jpeg\n")
    (folder / "bomb.png").write_bytes(bomb_png())


def make_collection(folder: Path) -> Path:
    """Every GOOD and BAD file, plus files that are not images (ignored), and a sub-folder with one image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, make in GOOD.items():
        make(rng).save(folder / name)
    make_bad(folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "table.csv").write_text("a,b\n")
    (folder / "sub").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(folder / "sub" / "deep.png")
    return folder


def make_plain(folder: Path, n: int, size: int = 28) -> list[Path]:
    """``n`` small random RGB PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def make_named(folder: Path, names: Iterable[str]) -> list[Path]:
    """Small random RGB images with these names, each in the format of its extension."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / name for name in names]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(p)
    return paths


def python_env() -> dict[str, str]:
    """The environment of a child ``python`` that imports this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def caption(folder, opt_dir, *extra) -> int:
    return cli.main(["caption", str(folder), "--model", str(opt_dir), *ARGS, *map(str, extra)])


def read_rows(out: Path) -> list[dict]:
    """The rows of a JSONL, CSV or Parquet output, without empty cells."""
    if out.suffix == ".csv":
        with open(out, newline="", encoding="utf-8") as f:
            return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [{k: v for k, v in row.items() if v is not None} for row in pq.read_table(out).to_pylist()]
    return [json.loads(line) for line in out.read_bytes().splitlines()]
