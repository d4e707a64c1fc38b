"""Resume after SIGKILL: a killed and resumed run ends exactly where an uninterrupted one does.

The killed run is a real subprocess that SIGKILLs itself at a chosen point (kill_runner.py); the
resuming run is the standalone CLI (`python -m worker.training`) in another subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from tests.worker.training.conftest import chat_rows, write_jsonl
from worker.training.checkpoint import list_checkpoints
from worker.training.config import load_config
from worker.training.outputs import JsonlLog
from worker.training.trainer import train

ROOT = Path(__file__).resolve().parents[3]
# Everything in a metrics row except wall-clock measurements.
DETERMINISTIC = (
    "step",
    "epoch",
    "loss",
    "nll",
    "mean_token_prob",
    "token_accuracy",
    "lr",
    "grad_norm",
    "step_tokens",
    "trained_tokens",
    "padding_fraction",
    "skipped",
    "valid_loss",
    "valid_nll",
)


def write_config(tmp_path: Path, name: str, model: Path, **extra: Any) -> Path:
    train = tmp_path / "train.jsonl"
    if not train.exists():
        write_jsonl(train, chat_rows(24, seed=5))
        write_jsonl(tmp_path / "valid.jsonl", chat_rows(6, seed=6))
    config = {
        "model": str(model),
        "loss": "dft",
        "train_file": str(train),
        "validation_file": str(tmp_path / "valid.jsonl"),
        "output_dir": str(tmp_path / name),
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "n_epochs": 2,
        "learning_rate": 2e-3,
        "warmup_ratio": 0.2,
        "checkpoint_every": 5,
        "eval_every": 4,
        "keep_last_n": 3,
        "device": "cpu",
        "seed": 7,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def final_weights(output_dir: Path) -> dict[str, Any]:
    (_, last), *_ = reversed(list_checkpoints(output_dir))
    name = (
        "adapter_model.safetensors" if (last / "adapter_model.safetensors").exists() else "model.safetensors"
    )
    return load_file(last / name)


def deterministic_rows(output_dir: Path) -> list[dict[str, Any]]:
    return [{k: r.get(k) for k in DETERMINISTIC} for r in JsonlLog(output_dir / "metrics.jsonl").read()]


@pytest.mark.parametrize(
    ("kill", "extra"),
    [
        (("--after-step", "7"), {}),  # killed between checkpoints, in the second epoch
        (("--in-save", "10"), {}),  # killed while step 10's checkpoint is written: not yet a checkpoint
        (
            ("--after-step", "7"),
            {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        ),  # adapter dropout uses the RNG
    ],
    ids=["full-after-step", "full-in-save", "lora-after-step"],
)
def test_sigkill_then_resume_matches_uninterrupted_run(
    tmp_path: Path, tiny_model_dropout: Path, kill: tuple[str, str], extra: dict[str, Any]
) -> None:
    # The uninterrupted run, in this process (the CLI path is exercised by the resumed run).
    straight = write_config(tmp_path, "straight", tiny_model_dropout, **extra)
    assert train(load_config(straight)).status == "completed"

    killed = write_config(tmp_path, "killed", tiny_model_dropout, **extra)
    died = run("-m", "tests.worker.training.kill_runner", str(killed), *kill)
    assert died.returncode == -signal.SIGKILL, died.stderr
    out = tmp_path / "killed"
    assert [s for s, _ in list_checkpoints(out)] == [5]  # the only complete checkpoint
    logged = [r["step"] for r in JsonlLog(out / "metrics.jsonl").read()]
    assert logged[-1] in (7, 10)  # steps after the checkpoint were done, and are lost

    resumed = run("-m", "worker.training", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())

    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert float((a[key] - b[key]).abs().max()) <= 1e-6, key
    rows_a, rows_b = deterministic_rows(tmp_path / "straight"), deterministic_rows(out)
    assert [r["step"] for r in rows_b] == list(range(1, 13))
    assert rows_a == rows_b
    events = (out / "events.jsonl").read_text()
    assert "resumed from checkpoint step-000005" in events
    if kill[0] == "--in-save":
        assert "incomplete checkpoint" in events
