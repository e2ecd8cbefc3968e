"""A real ``kill -9`` of a running ``python -m blipkit caption``, then a resume: none lost, none twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from batch_images import ROOT, make_plain, python_env
from hf_tiny import make_blip2

from blipkit.batch.files import key_of


def _command(folder: Path, model: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "blipkit", "caption", str(folder), "--model", str(model), "--out", str(out),
        "--max-new-tokens", "12", "--batch-size", "2", "--workers", "2", "--threads", "1",
    ]  # fmt: skip


def _lines(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def test_kill_mid_run_then_resume(tmp_path):
    model = tmp_path / "model"
    make_blip2(model, llm="opt", num_query_tokens=4)
    images = make_plain(tmp_path / "images", 300)
    out = tmp_path / "caps.jsonl"
    env = python_env()
    proc = subprocess.Popen(
        _command(tmp_path / "images", model, out),
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while _lines(out) < 20 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its decoding workers
        except ProcessLookupError:
            pass
    written = _lines(out)
    assert 20 <= written < len(images)  # killed mid-run
    rows = [json.loads(line) for line in out.read_bytes().split(b"\n")[:written]]  # whole lines parse

    done = subprocess.run(
        _command(tmp_path / "images", model, out),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"captioned {len(images) - len(rows)}, skipped {len(rows)}, failed 0"
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [r["path"] for r in rows]
    assert len(keys) == len(set(keys)) == len(images)
    assert set(keys) == {key_of(p) for p in images}
    assert all(isinstance(r["caption"], str) for r in rows)
