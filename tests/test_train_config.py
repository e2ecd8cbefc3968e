"""TrainConfig: JSON file then --key=value overrides; unknown keys are errors that name them."""

from __future__ import annotations

import json

import pytest

from blipkit.train.config import TrainConfig, load_config
from blipkit.train.schedule import DataOrder, lr_factor


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.001, "batch_size": 8, "data": "x.jsonl"}))
    cfg = load_config(path, ["--batch_size=4", "--precision=bf16", "--init_from=none", "--progress=false"])
    assert (cfg.lr, cfg.batch_size, cfg.precision, cfg.data) == (0.001, 4, "bf16", "x.jsonl")
    assert cfg.init_from is None and cfg.progress is False
    assert load_config(None, [], stage="stage1").stage == "stage1"


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(path)
    with pytest.raises(ValueError, match="'bach_size'"):
        load_config(None, ["--bach_size=3"])
    with pytest.raises(ValueError, match="--batch_size expects a int"):
        load_config(None, ["--batch_size=big"])
    with pytest.raises(ValueError, match="stage must be"):
        TrainConfig(stage="stage3")


def test_schedule_and_data_order():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    order = DataOrder(10, 4, seed=3, views=2, augment_prob=0.5)
    seen = list(order.examples(0)) + list(order.examples(1)) + list(order.examples(2))[:2]
    assert sorted(seen) == list(range(10))  # one epoch covers every example once
    assert list(DataOrder(10, 4, seed=3).examples(2)) == list(order.examples(2))  # depends on (seed, step)
    assert set(order.feature_views(5)) <= {0, 1}


def test_loss_weights():
    cfg = load_config(None, ["--loss_weights=itm=4, itg=0.25"])
    assert cfg.loss_weight == {"itm": 4.0, "itg": 0.25}
    assert TrainConfig().loss_weight == {}
    with pytest.raises(ValueError, match="'itx=1'"):
        load_config(None, ["--loss_weights=itx=1"])
    with pytest.raises(ValueError, match="'lots' in 'itm=lots' is not a number"):
        load_config(None, ["--loss_weights=itm=lots"])
