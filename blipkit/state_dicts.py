"""Reading safetensors weights and checking them strictly against a model: names, shapes, kinds, finiteness.

Every family's loader goes through ``check_state_dict`` / ``load_strict``: a missing, unexpected or
mis-shaped key is a ``CheckpointError`` naming it, never a silent random init.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from blipkit.errors import CheckpointError


# --- reading ------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return files


def read_state_dict(path: str | Path, prefix: str = "") -> dict[str, Tensor]:
    """All tensors of a safetensors dir (or file) whose name starts with ``prefix``, prefix removed."""
    path = Path(path)
    files = [path] if path.is_file() else _weight_files(path)
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    return out


def check_state_dict(expected: dict[str, Tensor], got: dict[str, Tensor], where: str) -> None:
    """Strict: every expected key present with the right shape and kind, finite, nothing unexpected.

    ``expected`` is the model's state dict (meta tensors do): its shapes and dtypes are the reference.
    """
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    common = sorted(set(expected) & set(got))
    mismatched = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    not_float = [
        f"{k}: {got[k].dtype}"
        for k in common
        if expected[k].is_floating_point() and not got[k].is_floating_point()
    ]
    non_finite = [k for k in common if got[k].is_floating_point() and not bool(torch.isfinite(got[k]).all())]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"mis-shaped keys {mismatched}")
    if not_float:
        problems.append(f"integer tensors where the model has floating point ones {not_float}")
    if non_finite:
        problems.append(f"tensors holding NaN/Inf values {non_finite}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def load_strict(module: nn.Module, state_dict: dict[str, Tensor], where: str) -> None:
    check_state_dict(module.state_dict(), state_dict, where)
    module.load_state_dict(state_dict, strict=True, assign=True)
