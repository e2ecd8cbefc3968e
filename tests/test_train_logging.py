"""What a training run shows while it runs: TensorBoard scalars, read back with tensorboard's own reader, and
the tqdm bar: on a real terminal (a pty) by default, in a pipe only when asked."""

from __future__ import annotations

import csv
import fcntl
import os
import struct
import sys
import termios
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_assets import run_overrides, tiny_assets

from blipkit.errors import ConfigError
from blipkit.train.config import load_config
from blipkit.train.distributed import DistEnv
from blipkit.train.logging import TENSORBOARD_DIR, scalar_tag, setting, show_progress
from blipkit.train.loop import Trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_assets(tmp_path_factory.mktemp("tiny-logging"))


def _train(tiny: Path, out: Path, resume: bool = False, on_step=None, **extra) -> Path:
    cfg = load_config(None, run_overrides(tiny, **({"export_fp16": "false"} | extra)), stage="stage2")
    return Trainer(cfg, out, resume=resume, env=DistEnv()).run(on_step)


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _csv(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "losses.csv").open()))


class Killed(Exception):
    pass


def test_tensorboard_holds_the_logged_losses_across_a_kill_and_resume(tiny, tmp_path):
    def kill_after_step_3(step, row):  # step 3 is logged, then lost: the checkpoint is at step 2
        if step == 3:
            raise Killed

    run = tmp_path / "run"
    with pytest.raises(Killed):
        _train(tiny, run, on_step=kill_after_step_3, tensorboard="true")
    _train(tiny, run, resume=True, tensorboard="true")
    scalars, rows = _scalars(run), _csv(run)
    assert {"loss/total", "loss/lm", "lr", "epoch", "samples_per_s"} <= set(scalars)
    for column in ("loss", "lm", "lr"):
        logged = scalars[scalar_tag(column)]
        assert [step for step, _ in logged] == [1, 2, 3, 4]  # step 3 of the killed run was dropped
        assert [v for _, v in logged] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)


def test_tensorboard_false_writes_no_events(tiny, tmp_path):
    _train(tiny, tmp_path / "run", max_steps=1, tensorboard="false")
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert len(_csv(tmp_path / "run")) == 1


def test_bar_in_a_pipe_only_when_asked(tiny, tmp_path, capfd):
    _train(tiny, tmp_path / "auto", max_steps=2, progress="auto", tensorboard="false")
    assert "samples/s" not in capfd.readouterr().err  # pytest's capture is not a terminal
    _train(tiny, tmp_path / "asked", max_steps=2, progress="true", tensorboard="false")
    err = capfd.readouterr().err
    assert "2/2" in err and "loss=" in err and "samples/s=" in err


def test_bar_on_a_terminal_by_default(tiny, tmp_path, monkeypatch):
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    terminal = os.fdopen(follower, "w")
    try:
        monkeypatch.setattr(sys, "stderr", terminal)
        _train(tiny, tmp_path / "run", max_steps=2, tensorboard="false")  # progress left at "auto"
        terminal.flush()
        os.set_blocking(leader, False)
        screen = b""
        while True:
            try:
                screen += os.read(leader, 65536)
            except (BlockingIOError, OSError):
                break
    finally:
        monkeypatch.undo()
        terminal.close()
        os.close(leader)
    text = screen.decode(errors="replace")
    assert "stage2" in text and "2/2" in text and "samples/s=" in text, text


def test_settings_are_checked(tiny, tmp_path):
    assert [setting("progress", v) for v in ("auto", "TRUE", False, "no")] == [None, True, False, False]
    assert show_progress("auto", open(os.devnull, "w")) is False
    with pytest.raises(ConfigError, match="tensorboard must be auto, true or false"):
        _train(tiny, tmp_path / "run", tensorboard="sometimes")
    assert not (tmp_path / "run").exists()  # refused before anything was written
