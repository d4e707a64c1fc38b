"""bench/claim_time.py times `claim_next_job` over a long queue on PostgreSQL; `--smoke` runs the whole
benchmark (fresh migrated database, seeding, claims, statement breakdown) with a tiny queue, so its
code paths are known to work with the current claim code. Figures are not checked: it is a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_claim_time_smoke_reports_p99() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.claim_time", "--smoke", "--database", "tunepool_bench_claim_smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # one JSON line; progress and summary go to stderr
    out = json.loads(lines[0])
    assert out["benchmark"] == "claim_time" and out["smoke"] is True
    assert out["seeding"]["queued"] == 200 and out["config"]["teams"] == 5
    claims = out["figures"]["claims"]
    assert claims["n"] == 20
    assert 0 < claims["p50_ms"] <= claims["p95_ms"] <= claims["p99_ms"] <= claims["max_ms"]
    statements = out["figures"]["statements"]  # the claim's SQL split by kind, plus the rest
    assert len(statements) > 2 and statements["other (python, session, commit)"]["n"] == 20, statements
    assert out["goals"]["claim_p99_ms"]["met"] == (claims["p99_ms"] <= 20.0)
    assert "p99" in proc.stderr and "goal p99 <= 20 ms: " in proc.stderr, proc.stderr[-3000:]
