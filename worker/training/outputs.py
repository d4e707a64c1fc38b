"""The run's files besides checkpoints: metrics.jsonl, events.jsonl and summary.json.

The worker (issue #4) tails metrics.jsonl and events.jsonl while the run goes on, so rows are
appended one whole line at a time and flushed. On resume, rows of steps after the checkpoint
are cut off: they are computed again, and the file ends up as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite float becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLog:
    """Append-only JSON lines, one flush per row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in row.items()}, allow_nan=False)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: it and anything after are dropped
        return rows

    def truncate_after_step(self, step: int) -> None:
        """Keep only rows with `step` <= step (rows without a step are kept), atomically."""
        rows = [r for r in self.read() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, self.path)


class RunLog:
    """metrics.jsonl and events.jsonl of one output_dir."""

    def __init__(self, output_dir: Path) -> None:
        self.metrics = JsonlLog(output_dir / METRICS_FILE)
        self.events = JsonlLog(output_dir / EVENTS_FILE)
        self.summary_path = output_dir / SUMMARY_FILE

    def event(self, level: str, message: str, step: int, **data: Any) -> dict[str, Any]:
        row = {"time": round(time.time(), 3), "level": level, "step": step, "message": message, **data}
        self.events.append(row)
        return row

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2, default=str))
        os.replace(tmp, self.summary_path)
