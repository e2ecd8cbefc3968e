"""A ``blipkit serve`` process on loopback for the benchmarks that drive a real server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def start_server(options: list[str], port: int, log: Path, startup_s: float) -> subprocess.Popen:
    """``blipkit serve OPTIONS --port PORT`` writing to ``log``, once its ``/health`` answers (SystemExit with
    the log if it exits or stays silent for ``startup_s``)."""
    command = [sys.executable, "-m", "blipkit", "serve", *options, "--port", str(port)]
    with open(log, "w") as f:
        server = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"the server did not answer /health within {startup_s:.0f} s")
