"""`python -m worker.training CONFIG`: progress, summary, and exit status 2 with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.worker.training.conftest import chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[3]


def cli(config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "worker.training", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_trains_and_prints_summary_then_reports_bad_config_and_data(tmp_path: Path, tiny_model: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    config = {
        "model": str(tiny_model),
        "train_file": "train.jsonl",
        "output_dir": "out",
        "batch_size": 4,
        "max_steps": 3,
        "device": "cpu",
    }
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(config))
    done = cli(tmp_path / "ok.yaml")
    assert done.returncode == 0, done.stderr
    assert "step 3/3" in done.stderr  # one progress line per step when not on a terminal
    assert "completed: 3/3 steps" in done.stdout and "padding" in done.stdout
    assert f"checkpoint: {tmp_path / 'out' / 'checkpoints' / 'step-000003'}" in done.stdout

    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump({**config, "batch_size": 4, "gradient_accumulation_steps": 3})
    )
    bad = cli(tmp_path / "bad.yaml")
    assert bad.returncode == 2 and "gradient_accumulation_steps: 3 does not divide batch_size 4" in bad.stderr

    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[4] = '{"messages": [{"role": "user", "content": 7}]}'
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text(
        yaml.safe_dump({**config, "train_file": "broken.jsonl", "output_dir": "o2"})
    )
    broken = cli(tmp_path / "data.yaml")
    assert broken.returncode == 2 and "train_file: 1 bad line" in broken.stderr
    assert "line 5:" in broken.stderr and "content" in broken.stderr
