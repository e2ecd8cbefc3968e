"""Optional dependencies: import one, or raise the error that names the extra bringing it."""

from __future__ import annotations

import importlib
from types import ModuleType

from blipkit.errors import missing_extra


def require(module: str, feature: str, extra: str, package: str | None = None) -> ModuleType:
    """``import module`` for ``feature``; missing, it is a ``MissingExtra`` (exit 1) saying what to install:
    "blipkit cluster needs scikit-learn: pip install 'blipkit[eval]'"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise  # something the optional package itself needs: not ours to explain
        raise missing_extra(feature, package or top, extra) from e
