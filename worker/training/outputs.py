"""The run's files besides checkpoints: metrics.jsonl, events.jsonl and summary.json.

The worker (issue #4) tails metrics.jsonl and events.jsonl while the run goes on, so rows are
appended one whole line at a time and flushed. On resume, rows of steps after the checkpoint
are cut off: they are computed again, and the file ends up as if the run had never stopped.

A kill or a full disk can leave a last line cut short (no newline). Opening a log drops it, so
that the next row does not get glued to it, and reading skips any line that does not parse.
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

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled  # False: a rank other than 0, which reads but never writes
        path.parent.mkdir(parents=True, exist_ok=True)
        if enabled:
            self.repair()

    def repair(self) -> bool:
        """Cut a last line left without its newline (a write that a kill or a full disk stopped
        halfway); True if there was one. Shrinks the file in place: needs no free space."""
        try:
            f = self.path.open("rb+")
        except FileNotFoundError:
            return False
        with f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return False
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return False
            end = size - 1
            while end > 0:  # back to the last newline, a block at a time
                start = max(0, end - 65536)
                f.seek(start)
                at = f.read(end - start).rfind(b"\n")
                if at >= 0:
                    end = start + at + 1
                    break
                end = start
            f.truncate(end)
            return True

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
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
                continue  # a line cut short by a kill or a full disk
        return rows

    def truncate_after_step(self, step: int) -> None:
        """Keep only rows with `step` <= step (rows without a step are kept), atomically."""
        if not self.enabled:
            return
        rows = [r for r in self.read() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)  # gone after the replace; a half-written copy otherwise


class RunLog:
    """metrics.jsonl, events.jsonl and summary.json of one output_dir. In a multi-GPU job every
    rank has one, and only rank 0's (`enabled`) writes: the one helper for rank-0-only I/O."""

    def __init__(self, output_dir: Path, *, enabled: bool = True) -> None:
        self.metrics = JsonlLog(output_dir / METRICS_FILE, enabled=enabled)
        self.events = JsonlLog(output_dir / EVENTS_FILE, enabled=enabled)
        self.summary_path = output_dir / SUMMARY_FILE
        self.enabled = enabled

    def event(self, level: str, message: str, step: int, **data: Any) -> dict[str, Any]:
        row = {"time": round(time.time(), 3), "level": level, "step": step, "message": message, **data}
        self.events.append(row)
        return row

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2, default=str))
        os.replace(tmp, self.summary_path)


# The metrics of the last step that summary.json repeats as "final".
_FINAL_FIELDS = (
    "loss",
    "nll",
    "mean_token_prob",
    "token_accuracy",
    "valid_loss",
    "valid_nll",
    "valid_token_accuracy",
)


def run_summary(
    status: str,
    loss_mode: str,
    steps: int,
    total_steps: int,
    counters: dict[str, int],
    data: Any,
    last_row: dict[str, Any],
    checkpoint: Path | None,
    **extra: Any,
) -> dict[str, Any]:
    """summary.json: how the run ended, what it trained on, its final metrics and checkpoint."""
    return {
        "status": status,
        "loss_mode": loss_mode,
        "steps": steps,
        "total_steps": total_steps,
        "trained_tokens": counters["trained_tokens"],
        "padding_fraction": 1.0 - counters["real_tokens"] / max(counters["processed_tokens"], 1),
        "skipped_steps": counters["skipped_steps"],
        "examples": len(data.examples),
        "truncated_examples": data.stats.n_truncated,
        "dropped_examples": data.stats.n_dropped,
        "final": {k: v for k, v in last_row.items() if k in _FINAL_FIELDS},
        "checkpoint": str(checkpoint) if checkpoint else None,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in extra.items()},
    }
