"""The training child on a disk that fills during its first checkpoint: it exits with its storage
status (4), after removing the half-written checkpoint, and says in error.json which errno and file
failed, so that the parent can name them although the disk is full."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.disks import tmpfs
from tests.service.conftest import ROOT
from tests.worker.training.conftest import build_model_dir, chat_rows
from worker.child import ERROR_FILE, EXIT_STORAGE


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("child-model"))


def test_a_disk_full_at_the_first_checkpoint_exits_with_status_4(model: Path, tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8)))
    run = tmp_path / "run"
    # Room for the config, metrics and events, not for the weights (~117 KiB) of a checkpoint.
    with tmpfs(run, "96k"):
        config = {
            "model": str(model), "train_file": str(train), "output_dir": str(run / "output"),
            "batch_size": 4, "max_seq_length": 128, "max_steps": 2, "checkpoint_every": 2,
        }  # fmt: skip
        (run / "config.json").write_text(json.dumps(config))
        done = subprocess.run(
            [sys.executable, "-m", "worker.child", str(run)],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == EXIT_STORAGE, done.stdout[-3000:] + done.stderr[-3000:]
        reported = json.loads((run / ERROR_FILE).read_text())["storage"]
        assert reported["errno"] == "ENOSPC", reported
        assert "No space left on device" in done.stderr  # the traceback reached the log, room was freed
        assert list((run / "output" / "checkpoints").iterdir()) == []  # no half checkpoint is left
        metrics = (run / "output" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in metrics] == [1, 2]
