"""``--engine ray`` on a local Ray instance: the same rows as the local engine, and the same resume."""

from __future__ import annotations

import json

import pytest
from batch_images import make_bad, make_plain
from hf_tiny import make_blip2

from blipkit import cli

pytest.importorskip("ray.data")


def test_ray_engine_matches_local_and_resumes(tmp_path, capsys):
    model = tmp_path / "model"
    make_blip2(model, llm="opt", num_query_tokens=4)
    folder = tmp_path / "images"
    make_plain(folder, 5)
    make_bad(folder)
    args = ["caption", str(folder), "--model", str(model), "--max-new-tokens", "4", "--batch-size", "2"]
    local, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert cli.main([*args, "--out", str(local)]) == 3
    first = sorted(json.loads(line)["path"] for line in local.read_text().splitlines())[:3]
    ray_out.write_text(
        "".join(line + "\n" for line in local.read_text().splitlines() if json.loads(line)["path"] in first)
    )
    capsys.readouterr()
    try:
        assert cli.main([*args, "--out", str(ray_out), "--engine", "ray", "--concurrency", "1"]) == 3
    finally:
        import ray

        ray.shutdown()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("captioned 4, skipped 3, failed")
    rows = sorted(local.read_text().splitlines())
    assert sorted(ray_out.read_text().splitlines()) == rows
