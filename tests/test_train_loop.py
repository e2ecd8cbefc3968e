"""The training loop on tiny random models: 2 processes = 1 process, and kill + --resume = uninterrupted."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_assets import run_overrides, tiny_assets

from blipkit.loading import read_state_dict
from blipkit.train.config import load_config
from blipkit.train.distributed import DistEnv
from blipkit.train.loop import ResumeError, Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_assets(tmp_path_factory.mktemp("tiny-train"))


def _overrides(tiny: Path, **extra) -> list[str]:
    features = {"warm_start_steps": 1, "stage1_weight": 0.5, "caption_examples": "true", "views": 2}
    return run_overrides(tiny, **(features | {"augment_prob": 0.5, "progress": "false"} | extra))


def _losses(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "losses.csv").open()))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(run / "final" / "bridge.safetensors")


def _train(tiny: Path, out: Path, stage: str = "stage2", resume: bool = False, on_step=None, **extra) -> Path:
    cfg = load_config(None, _overrides(tiny, **extra), stage=stage)
    return Trainer(cfg, out, resume=resume, env=DistEnv()).run(on_step)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(command: list[str], env: dict, timeout: int = 120) -> tuple[int, str]:
    """Run torchrun in its own process group, so a hang cannot leave worker processes behind."""
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s: {stderr[-3000:]}")
    return proc.returncode, stderr


class Killed(Exception):
    pass


def test_kill_and_resume_reproduce_the_loss_curve(tiny, tmp_path):
    _train(tiny, tmp_path / "whole")

    def kill_after_step_3(step, row):  # one step after the checkpoint at step 2: that step is lost
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        _train(tiny, tmp_path / "cut", on_step=kill_after_step_3)
    with pytest.raises(ResumeError, match="--resume"):
        _train(tiny, tmp_path / "cut")
    _train(tiny, tmp_path / "cut", resume=True)
    whole, cut = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert [r["step"] for r in cut] == ["1", "2", "3", "4"]
    for a, b in zip(whole, cut, strict=True):
        assert a["loss"] == b["loss"], (a, b)
    assert set(whole[0]) >= {"warm_start", "lm", "itc", "itm", "itg"}
    for name, tensor in _weights(tmp_path / "whole").items():
        torch.testing.assert_close(tensor, _weights(tmp_path / "cut")[name], rtol=0, atol=0)
    assert (tmp_path / "whole" / "losses.png").exists()
    assert (tmp_path / "whole" / "final-fp16" / "bridge.safetensors").exists()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_two_processes_equal_one(tiny, tmp_path, stage):
    _train(tiny, tmp_path / "one", stage=stage, max_steps=3)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "blipkit.train",
        stage,
        "--out",
        str(tmp_path / "two"),
        *_overrides(tiny, max_steps=3),
    ]
    returncode, stderr = _run_group(command, env)
    assert returncode == 0, stderr[-3000:]
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        if name.endswith(".k.bias"):  # no gradient in exact arithmetic (softmax is shift-invariant): Adam
            continue  # turns the rounding noise into updates, which never reach any output
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)


def test_trainable_prefixes_freeze_the_rest(tiny, tmp_path):
    _train(tiny, tmp_path / "base", stage="stage1", max_steps=1)
    _train(
        tiny,
        tmp_path / "heads",
        stage="stage1",
        max_steps=2,
        init_from=tmp_path / "base" / "final",
        trainable="qformer.text_proj,qformer.temp",
    )
    before, after = _weights(tmp_path / "base"), _weights(tmp_path / "heads")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"qformer.text_proj.weight", "qformer.text_proj.bias", "qformer.temp"}


def test_keep_loss_holds_the_visual_prompt_to_the_teacher(tiny, tmp_path):
    base = _train(tiny, tmp_path / "base", max_steps=1, stage1_weight=0)
    cfg = load_config(
        None,
        _overrides(
            tiny,
            init_from=base,
            teacher=base,
            warm_start_steps=0,
            loss_weights="lm=0,itc=0,itg=0,itm=4,keep=10",
            max_steps=3,
        ),
        stage="stage2",
    )
    trainer = Trainer(cfg, tmp_path / "keep", env=DistEnv())
    assert trainer.teacher.llm is trainer.model.llm  # shared, not copied
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    llm_calls = []
    trainer.model.llm.register_forward_pre_hook(lambda *args: llm_calls.append(1))
    trainer.model.llm.base_model.register_forward_pre_hook(lambda *args: llm_calls.append(1))
    trainer.run()
    rows = _losses(tmp_path / "keep")
    assert "lm" not in rows[0] and llm_calls == []  # lm weighted 0: the LLM is never run
    assert float(rows[0]["keep"]) == 0.0  # the run starts from the teacher itself
    assert float(rows[-1]["keep"]) > 0.0  # ITM moved the Q-Former, and the keep loss sees it
    expected = 4 * float(rows[-1]["itm"]) + 10 * float(rows[-1]["keep"])  # itc and itg weighted 0
    assert float(rows[-1]["loss"]) == pytest.approx(expected, rel=1e-5)


def test_keep_loss_and_weights_are_checked(tiny, tmp_path):
    with pytest.raises(ValueError, match="stage 2"):
        load_config(None, _overrides(tiny, teacher=tiny), stage="stage1")
    with pytest.raises(ValueError, match="no loss"):
        _train(tiny, tmp_path / "none", stage1_weight=0, warm_start_steps=0, loss_weights="lm=0")
    with pytest.raises(Exception, match="no \\*.safetensors weights in .*nowhere"):
        _train(tiny, tmp_path / "missing", teacher=tmp_path / "nowhere")


def test_init_from_refuses_integer_tensors(tiny, tmp_path):
    """A float tensor stored as integers is named, not silently converted."""
    from safetensors.torch import load_file, save_file

    from blipkit.errors import CheckpointError

    base = _train(tiny, tmp_path / "base", stage="stage1", max_steps=1)
    weights = load_file(str(base / "bridge.safetensors"))
    weights["qformer.temp"] = torch.tensor(1, dtype=torch.int64)
    save_file(weights, str(base / "bridge.safetensors"))
    with pytest.raises(CheckpointError, match=r"integer tensors.*temp"):
        _train(tiny, tmp_path / "next", stage="stage1", max_steps=1, init_from=base)
