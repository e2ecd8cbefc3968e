"""Ordinary mistakes end in one line and the right exit code, not a traceback."""

from __future__ import annotations

import sys

import pytest
import torch

import blipkit
from blipkit import cli
from blipkit.errors import EXIT_CRASH, EXIT_USAGE, EnvironmentProblem, MissingExtra, UsageError
from blipkit.extras import require


def test_bad_devices_are_refused_before_loading(opt_dir):
    with pytest.raises(UsageError, match="'gpu' is not a device"):
        blipkit.load(opt_dir, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(EnvironmentProblem, match="no CUDA GPU; use --device cpu"):
            blipkit.load(opt_dir, device="cuda")


def test_cli_device_errors(opt_dir, capsys):
    assert cli.main(["ask", "x.png", "what?", "--model", str(opt_dir), "--device", "gpu"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blipkit: error: --device 'gpu'")


def test_a_missing_extra_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(
        MissingExtra, match=r"blipkit cluster needs scikit-learn: pip install 'blipkit\[eval\]'"
    ):
        require("sklearn.cluster", "blipkit cluster", "eval", "scikit-learn")
    assert MissingExtra.exit_code == EXIT_CRASH
    assert require("json", "anything", "none").dumps([]) == "[]"


def test_cli_cluster_without_scikit_learn(retrieval_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    argv = [
        "cluster",
        str(tmp_path),
        "-k",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--model",
        str(retrieval_dir),
    ]
    assert cli.main(argv) == EXIT_CRASH
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "blipkit: error: blipkit cluster needs scikit-learn: pip install 'blipkit[eval]'"
    assert not any("Traceback" in line for line in err)


def test_an_internal_bug_is_a_crash_not_a_usage_error(monkeypatch, capsys):
    def broken(args):
        raise ValueError("zip() argument 2 is shorter than argument 1")

    monkeypatch.setattr(cli, "cmd_ask", broken)
    assert cli.main(["ask", "x.png", "what?"]) == EXIT_CRASH
    err = capsys.readouterr().err
    assert "Traceback" in err and "this is a bug in blipkit" in err
