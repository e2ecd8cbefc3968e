"""What a training run shows while it runs: a tqdm bar and TensorBoard scalars, from the main process only,
beside ``losses.csv`` / ``losses.png``.

``progress`` and ``tensorboard`` in ``TrainConfig`` take "auto", "true" or "false" (JSON booleans too):

- ``progress``: "auto" draws the bar (step, loss, samples/s, ETA) when stderr is a terminal, as ``blipkit
  caption`` / ``index`` / ``eval`` decide; "true" (``--progress=true``) also into pipes and log files.
- ``tensorboard``: "auto" writes ``OUT/tensorboard`` when the ``tensorboard`` package is installed (it
  comes with ``pip install 'blipkit[train]'``); "true" needs it; "false" never. View: ``tensorboard --logdir
  OUT``.

Scalar tags: ``loss/total`` (the CSV's ``loss``), ``loss/<part>`` (lm, warm_start, keep, itc, itm, itg),
``lr``, ``epoch`` and ``samples_per_s``, each at the run's step (1-based, as in ``losses.csv``). A resumed
run marks its first new step as a restart, so TensorBoard drops what a killed run logged past its checkpoint.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import IO, Any

from blipkit.errors import ConfigError
from blipkit.extras import require

TENSORBOARD_DIR = "tensorboard"
NOT_LOSSES = ("lr", "epoch", "samples_per_s")
_SETTINGS = {"auto": None, "true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def setting(name: str, value: bool | str) -> bool | None:
    """A ``progress`` / ``tensorboard`` value as True, False, or None for "auto"."""
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if key not in _SETTINGS:
        raise ConfigError(f"{name} must be auto, true or false, got {value!r}")
    return _SETTINGS[key]


def canonical(name: str, value: bool | str) -> bool | str:
    """A ``progress`` / ``tensorboard`` value as True, False or "auto" (``TrainConfig`` keeps this form)."""
    wanted = setting(name, value)
    return "auto" if wanted is None else wanted


def show_progress(value: bool | str, stream: IO | None = None) -> bool:
    """Whether to draw the bar on ``stream`` (default stderr): asked for, or "auto" and a terminal."""
    wanted = setting("progress", value)
    if wanted is not None:
        return wanted
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def use_tensorboard(value: bool | str) -> bool:
    """Whether to write TensorBoard events; "true" without the package is a ``MissingExtra`` (exit 1)."""
    wanted = setting("tensorboard", value)
    if wanted is None:
        return importlib.util.find_spec("tensorboard") is not None
    if wanted:
        require("tensorboard", "TensorBoard logging (tensorboard=true)", "train")
    return wanted


def check_settings(cfg: Any) -> None:
    """Fail at start, not after the feature cache, on a bad value or a missing package."""
    setting("progress", cfg.progress)
    use_tensorboard(cfg.tensorboard)


def scalar_tag(column: str) -> str:
    """The TensorBoard tag of a ``losses.csv`` column."""
    if column == "loss":
        return "loss/total"
    return column if column in NOT_LOSSES else f"loss/{column}"


class RunLog:
    """The live report of a run from ``start`` (steps done) to ``total`` steps; inactive off the main
    process. Call ``step(row)`` with each ``losses.csv`` row, ``flush()`` at checkpoints, ``close()`` once."""

    def __init__(self, cfg: Any, out: str | Path, start: int, is_main: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=cfg.max_steps,
            initial=start,
            desc=cfg.stage,
            unit="step",
            dynamic_ncols=True,
            disable=not (is_main and show_progress(cfg.progress)),
        )
        self.writer = None
        if is_main and use_tensorboard(cfg.tensorboard):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a killed run wrote past the resumed checkpoint (steps > start) are dropped
            self.writer = SummaryWriter(str(Path(out) / TENSORBOARD_DIR), purge_step=start + 1)

    def step(self, row: dict[str, float]) -> None:
        postfix = {"loss": f"{row['loss']:.4f}", "samples/s": f"{row['samples_per_s']:.1f}"}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        if self.writer is not None:
            for column, value in row.items():
                if column != "step" and value is not None:
                    self.writer.add_scalar(scalar_tag(column), value, row["step"])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
