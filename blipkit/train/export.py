"""Write a blipkit checkpoint's trained weights in fp16 (half the size) next to its config."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from blipkit import loading


def export_fp16(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Copy ``checkpoint`` to ``out_dir`` with every floating-point tensor stored as fp16."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = loading.read_state_dict(checkpoint / loading.BRIDGE_FILE)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, str(out / loading.BRIDGE_FILE), metadata={"format": "pt"})
    shutil.copy(checkpoint / "config.json", out / "config.json")
    for name in (loading.BRIDGE_FILE, "config.json"):  # shipped as package data: readable by everyone
        (out / name).chmod(0o644)
    return out
