"""bench/pool_sim.py runs the real claim and reconciler (worker/claim.py, worker/reconciler.py) over a
synthetic trace on a virtual clock, against FIFO; `--smoke --sqlite` runs the whole benchmark with 150
jobs on a SQLite file. The goals are not checked (it is a report), but the simulation's own
bookkeeping is: every job of the trace ran its whole work to the end in both simulations, the real
claim never put more GPUs on a node than it has, and the database agrees with the simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pool_sim_smoke_reports_both_policies() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.pool_sim", "--smoke", "--sqlite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # one JSON line; progress and the table go to stderr
    out = json.loads(lines[0])
    assert out["benchmark"] == "pool_sim" and out["smoke"] is True
    assert out["trace"]["jobs"] == 150
    for name in ("tunepool", "fifo"):
        p = out["policies"][name]
        assert 0 < p["utilisation_while_waiting"] <= 1, (name, p)
        assert 0 < p["jain"] <= 1, (name, p)
        assert p["wait"]["all"]["n"] == 150 and p["wait"]["1"]["p50_s"] <= p["wait"]["1"]["p95_s"]
        assert p["preempt_lost_fraction"] >= 0 and p["preemptions"] >= 0
        # the simulation's own sanity: could fail, and would mean a bug of the claim or the bench
        assert p["jobs_finished"] == 150, (name, p["jobs_finished"])
        assert p["work_conserved"], name  # busy - lost GPU-seconds = the trace's GPU-seconds
        assert p["max_overcommit"] == 0, (name, p["max_overcommit"])
    ours = out["policies"]["tunepool"]
    assert ours["anomalies"] == [], ours["anomalies"]
    assert ours["db"]["statuses"] == {"succeeded": 150}, ours["db"]
    assert ours["db"]["preemptions"] == ours["preemptions"]
    assert ours["calls"]["claims"] >= 150 and ours["calls"]["schedule_rounds"] > 0
    assert out["sanity"]["ok"], out["sanity"]
    assert set(out["goals"]) == {
        "utilisation_while_waiting", "jain", "p95_wait_8_gpu_over_fifo", "preempt_lost_fraction"
    }  # fmt: skip
    for name, goal in out["goals"].items():
        assert isinstance(goal["met"], bool), name
        assert f"goal {name} " in proc.stderr
    assert "Jain's index" in proc.stderr and "FIFO" in proc.stderr
