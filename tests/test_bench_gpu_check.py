"""bench/gpu_check.py runs only on a GPU machine; `--smoke` runs every one of its parts on the CPU
with tiny shapes, so its code paths are known to work before GPU time is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_part() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # one JSON line; progress goes to stderr
    out = json.loads(lines[0])
    assert out["bench"] == "gpu_check" and out["smoke"] is True
    parts = out["parts"]
    assert set(parts) == {"loss_check", "trainer_step", "loss_bench", "full_finetune", "mfu"}
    failed = {name: part.get("error") for name, part in parts.items() if not part["ok"]}
    assert not failed, failed
    assert out["failed_parts"] == [] and out["failed_checks"] == [], out
    assert all(parts["trainer_step"][p]["finite"] for p in ("fp32", "bf16-mixed", "bf16-pure"))
    configs = parts["full_finetune"]["configs"]
    assert len(configs) == 8 and all(c["tokens_per_sec"] > 0 for c in configs.values())
    assert set(parts["mfu"]["configs"]) == set(configs)
