"""One job on K processes (real torchrun, gloo on CPU) trains exactly what one process trains with
the same global batch, writes one consolidated checkpoint, resumes on another K, and dies as a
group when one rank dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.worker.training.conftest import chat_rows, write_jsonl
from tests.worker.training.test_resume import final_weights
from worker.training.checkpoint import list_checkpoints
from worker.training.outputs import JsonlLog

ROOT = Path(__file__).resolve().parents[3]
ROW_KEYS = ("step", "loss", "nll", "step_tokens", "token_accuracy", "valid_loss", "valid_nll")


def write_config(tmp_path: Path, name: str, model: Path, **extra: Any) -> Path:
    train = tmp_path / "train.jsonl"
    if not train.exists():
        write_jsonl(train, chat_rows(20, seed=3))
        write_jsonl(tmp_path / "valid.jsonl", chat_rows(5, seed=4))
    config = {
        "model": str(model),
        "loss": "dft",
        "train_file": str(train),
        "validation_file": str(tmp_path / "valid.jsonl"),  # 5: the ranks evaluate 3 and 2
        "eval_every": 2,
        "output_dir": str(tmp_path / name),
        "batch_size": 5,  # odd: one rank of two gets the extra sequence
        "micro_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "max_seq_length": 256,
        "checkpoint_every": 2,
        "device": "cpu",
        "seed": 11,
        "collective_timeout_s": 30,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(*args: str, nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`python -m ...` in one process, or under torchrun with `nproc` processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(
        [*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def rows(output_dir: Path) -> list[dict[str, Any]]:
    return [{k: r.get(k) for k in ROW_KEYS} for r in JsonlLog(output_dir / "metrics.jsonl").read()]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Every tensor equal to `rel` relative error (norm-wise: one entry whose gradient is a sum that
    nearly cancels may differ in its last bits, and Adam turns any non-zero gradient into a step)."""
    assert a.keys() == b.keys() and a
    for key in a:
        x, y = a[key].double(), b[key].double()
        assert float((x - y).norm()) <= rel * float(x.norm().clamp(min=1e-30)), key


def assert_same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b, strict=True):
        assert ra["step_tokens"] == rb["step_tokens"]
        for key in ("loss", "nll", "token_accuracy", "valid_loss", "valid_nll"):
            if ra[key] is None:  # no evaluation at this step
                assert rb[key] is None, (ra["step"], key)
                continue
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    last = a[-1]["step"]  # evaluated every eval_every (2) steps and at the end
    assert [r["step"] for r in a if r["valid_nll"] is not None] == [
        s for s in range(1, last + 1) if s % 2 == 0 or s == last
    ]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.worker.training.conftest import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("dist-model"), tie=False)


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("fsdp", {}),  # auto: a full fine-tune is sharded
        ("ddp", {"distributed": "ddp"}),
        ("ddp-lora", {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}),  # auto: LoRA is replicated
    ],
)
def test_two_processes_train_what_one_process_trains(
    tmp_path: Path, model: Path, mode: str, extra: dict[str, Any]
) -> None:
    one = write_config(tmp_path, "one", model, **extra)
    two = write_config(tmp_path, "two", model, **extra)
    single = run("-m", "worker.training", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    pair = run("-m", "worker.training", str(two), nproc=2)
    assert pair.returncode == 0, pair.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    assert_same_rows(rows(tmp_path / "one"), rows(tmp_path / "two"))
    events = (tmp_path / "two" / "events.jsonl").read_text()
    assert f"training on 2 cpu processes ({mode.split('-')[0]})" in events
    # one writer: every event once, one checkpoint directory per saved step
    assert events.count("saved checkpoint step-000002") == 1
    assert [s for s, _ in list_checkpoints(tmp_path / "two")] == [2, 3]


@pytest.fixture(scope="module")
def straight(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of an uninterrupted 4-step run in one process, that interrupted runs must match."""
    tmp_path = tmp_path_factory.mktemp("straight")
    assert (
        run("-m", "worker.training", str(write_config(tmp_path, "straight", model, max_steps=4))).returncode
        == 0
    )
    return tmp_path / "straight"


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)], ids=["K2-then-K1", "K1-then-K2"])
def test_killed_and_resumed_on_another_number_of_processes(
    tmp_path: Path, model: Path, straight: Path, first: int, then: int
) -> None:
    killed = write_config(tmp_path, "killed", model, max_steps=4)
    died = run("-m", "tests.worker.training.kill_runner", str(killed), "--after-step", "3", nproc=first)
    assert died.returncode != 0
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [2]  # step 3 was lost with the kill
    resumed = run("-m", "worker.training", str(killed), nproc=then)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(straight), final_weights(tmp_path / "killed"))
    assert_same_rows(rows(straight), rows(tmp_path / "killed"))
    assert "resumed from checkpoint step-000002" in (tmp_path / "killed" / "events.jsonl").read_text()


def test_a_rank_killed_mid_step_takes_the_group_down_and_the_job_resumes(
    tmp_path: Path, model: Path, straight: Path
) -> None:
    killed = write_config(tmp_path, "killed", model, max_steps=4)
    died = run(
        "-m", "tests.worker.training.kill_runner", str(killed), "--mid-step", "3", "--rank", "1", nproc=2
    )
    group_down = time.time()
    assert died.returncode != 0
    assert f"exitcode  : {-signal.SIGKILL}" in died.stderr  # rank 1 died of the SIGKILL
    # rank 0, waiting in a collective for rank 1, was gone well within the collective timeout (30 s)
    killed_at = float((tmp_path / "killed" / "killed_at").read_text())
    assert group_down - killed_at < 30, group_down - killed_at
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [2]
    resumed = run("-m", "worker.training", str(killed), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(straight), final_weights(tmp_path / "killed"))
