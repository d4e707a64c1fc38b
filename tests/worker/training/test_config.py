"""Config files: JSON and YAML, relative paths, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.training.config import ConfigError, load_config, parse_config

BASE = {"model": "m", "train_file": "t.jsonl", "output_dir": "out"}


def test_yaml_and_json_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "model-dir").mkdir()
    (tmp_path / "a.yaml").write_text(
        "model: model-dir\ntrain_file: data/t.jsonl\noutput_dir: out\nloss: sft\n"
    )
    (tmp_path / "b.json").write_text(json.dumps({**BASE, "model": "org/hub-model", "lora": {"r": 8}}))
    a = load_config(tmp_path / "a.yaml")
    assert a.model == str(tmp_path / "model-dir") and a.train_file == tmp_path / "data" / "t.jsonl"
    assert a.loss == "sft" and a.output_dir == tmp_path / "out"
    b = load_config(tmp_path / "b.json")
    assert b.model == "org/hub-model" and b.lora is not None and b.lora.r == 8 and b.loss == "dft"
    assert b.max_grad_norm == 1.0 and b.lr_scheduler == "cosine"  # the paper's recipe by default


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loss": "kl"}, "loss: Input should be 'sft' or 'dft'"),
        (
            {"batch_size": 8, "gradient_accumulation_steps": 3},
            "gradient_accumulation_steps: 3 does not divide batch_size 8",
        ),
        ({"eval_every": 10}, "eval_every: set validation_file too"),
        ({"warmup_ratio": 1.0}, "warmup_ratio: Input should be less than 1"),
        ({"learning_rate": 0}, "learning_rate: Input should be greater than 0"),
        ({"lr_scheduler": "step"}, "lr_scheduler: Input should be 'cosine', 'linear' or 'constant'"),
        ({"max_steps": 0}, "max_steps: Input should be greater than or equal to 1"),
        ({"lora": {"r": 0}}, "lora.r: Input should be greater than or equal to 1"),
        ({"lora": {"target_modules": []}}, "lora.target_modules: give at least one module name"),
        ({"lora": {"rank": 8}}, "lora.rank: unknown field"),
        ({"n_epoch": 2}, "n_epoch: unknown field"),
        ({"device": "tpu"}, "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"model": None}, "model: Input should be a valid string"),
    ],
)
def test_impossible_values_name_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, **fields})
    assert message in str(err.value)


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"model": "m", "loss": "x", "batch_size": -1})
    text = str(err.value)
    for field in ("train_file: Field required", "output_dir: Field required", "loss:", "batch_size:"):
        assert field in text


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid json"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
