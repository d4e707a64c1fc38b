"""What `JobRun.spawn` gives a training child (worker/runner.py): its own GPUs of the node
(CUDA_VISIBLE_DEVICES), CUDA's allocator setting unless the operator set one, and the RLIMIT_AS of
TUNEPOOL_JOB_MEMORY_LIMIT_BYTES on CPU workers only. The child here is a probe printing what it
got, started the way spawn starts the trainer."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.settings import load_settings
from worker.claim import Claim
from worker.runner import JobRun

PROBE = (
    "import os, resource; "
    "print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), resource.getrlimit(resource.RLIMIT_AS)[0], "
    "os.environ.get('CUDA_VISIBLE_DEVICES', '-'))"
)
LIMIT = 64 * 1024**3


def spawned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: list[int] | None
) -> tuple[str, int, str]:
    """(PYTORCH_CUDA_ALLOC_CONF, RLIMIT_AS soft limit, CUDA_VISIBLE_DEVICES) of a child spawned by
    a run given `devices` of the node."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # what the worker itself sees does not leak in
    settings = load_settings(home=tmp_path, job_memory_limit_bytes=LIMIT)
    claim = Claim("ftjob-spawn", 1, "default")
    run = JobRun(None, settings, claim, "w", devices=devices)  # type: ignore[arg-type]
    run.dir.mkdir(parents=True)
    real_popen = subprocess.Popen

    def probe(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        assert args[1:3] == ["-m", "worker.child"]
        return real_popen([sys.executable, "-c", PROBE], **kwargs)  # same env, limits, process group

    monkeypatch.setattr(subprocess, "Popen", probe)
    run.spawn()
    assert run.proc is not None and run.proc.wait(60) == 0
    alloc, limit, visible = run.log_path.read_text().split()
    return alloc, int(limit), visible


def test_a_cpu_worker_limits_address_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert spawned(tmp_path, monkeypatch, devices=None)[:2] == ("expandable_segments:True", LIMIT)


def test_a_gpu_worker_does_not_and_the_operators_allocator_setting_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert spawned(tmp_path, monkeypatch, devices=[2, 3]) == (
        "max_split_size_mb:128",
        resource.getrlimit(resource.RLIMIT_AS)[0],  # this process's own (unlimited unless set)
        "2,3",  # the job's own GPUs of the node
    )
