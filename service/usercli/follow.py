"""`tunepool jobs follow` (live progress) and `tunepool jobs download` (resumable)."""

from __future__ import annotations

import re
import tarfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from service.usercli.common import (
    TERMINAL,
    TO_OPTION,
    Api,
    _pages,
    check,
    fail,
    jobs_app,
)


def metrics_text(row: dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in (
        ("loss", "loss", "{:.4g}"),
        ("nll", "nll", "{:.4f}"),
        ("token_accuracy", "acc", "{:.3f}"),
        ("tokens_per_sec", "tok/s", "{:.0f}"),
        ("valid_nll", "valid_nll", "{:.4f}"),
    ):
        value = row.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {fmt.format(value)}" if label != "tok/s" else f"{fmt.format(value)} tok/s")
    return "  ".join(parts)


class Follower:
    """New metric rows and events of one job since the last poll."""

    def __init__(self, api: Api, job_id: str) -> None:
        self.api, self.job_id = api, job_id
        self.last_step = 0
        self.seen: set[str] = set()

    def new_metrics(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while True:
            page = self.api.get(f"/v1/fine_tuning/jobs/{self.job_id}/metrics", after_step=self.last_step)
            rows += page["data"]
            if page["data"]:
                self.last_step = page["data"][-1]["step"]
            if not page["has_more"]:
                return rows

    def new_events(self) -> list[dict[str, Any]]:
        """Unseen events, oldest first (the list is newest first: read back to a seen one)."""
        fresh: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.api.get(f"/v1/fine_tuning/jobs/{self.job_id}/events", after=after, limit=100)
            for event in page["data"]:
                if event["id"] in self.seen:
                    break
                fresh.append(event)
            else:
                if page["has_more"] and page["data"]:
                    after = page["data"][-1]["id"]
                    continue
            break
        self.seen.update(e["id"] for e in fresh)
        return fresh[::-1]


@jobs_app.command("follow")
def jobs_follow(
    job_id: str,
    interval: float = typer.Option(1.0, help="seconds between polls"),
) -> None:
    """Follow a job live: progress (step/total, ETA, loss, NLL, accuracy, tokens/s) and its events.

    Exits 0 when the job succeeds, 1 when it fails or is cancelled."""
    api = Api()
    follower = Follower(api, job_id)
    job = api.get(f"/v1/fine_tuning/jobs/{job_id}")
    console = Console(stderr=False)
    tty = console.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        disable=not tty,
    )
    task = progress.add_task(job["status"], total=job["progress"]["total_steps"], metrics="")

    def say(text: str) -> None:
        if tty:
            progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def show_events(events: list[dict[str, Any]]) -> None:
        for event in events:
            say(f"[{time.strftime('%H:%M:%S', time.localtime(event['created_at']))}] {event['message']}")

    with progress:
        while True:
            # Events are read before the metrics (so none is missed); before the first step they
            # come first (setup), after it they follow this poll's steps (checkpoints, the end).
            events = follower.new_events()
            before_training = follower.last_step == 0
            if before_training:
                show_events(events)
            for row in follower.new_metrics():
                data = row["data"]
                total = data.get("total_steps") or job["progress"]["total_steps"]
                progress.update(task, completed=row["step"], total=total, metrics=metrics_text(data))
                if not tty:
                    say(f"step {row['step']}/{total or '?'}  {metrics_text(data)}")
            if not before_training:
                show_events(events)
            if job["status"] in TERMINAL:
                break
            time.sleep(interval)
            job = api.get(f"/v1/fine_tuning/jobs/{job_id}")
            p = job["progress"]
            progress.update(
                task,
                description=job["status"],
                total=p["total_steps"] or None,
                completed=max(p["steps_completed"], follower.last_step),
            )
    status = job["status"]
    if status == "succeeded":
        typer.echo(
            f"job {job_id} succeeded: {job['fine_tuned_model']} ({job['trained_tokens']} trained tokens)"
        )
        return
    if status == "failed":
        error = job.get("error") or {}
        fail(f"job {job_id} failed: {error.get('code')}: {error.get('message')}")
    fail(f"job {job_id} was cancelled")


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@jobs_app.command("download")
def jobs_download(
    job_id: str,
    checkpoint: int | None = typer.Option(None, help="the checkpoint's step (default: the latest)"),
    to: Path = TO_OPTION,
    extract: bool = typer.Option(False, "--extract", help="also unpack the tar into --to"),
) -> None:
    """Download a checkpoint as a tar (to <job>-step-N.tar); an interrupted download resumes."""
    api = Api()
    checkpoints = _pages(api, f"/v1/fine_tuning/jobs/{job_id}/checkpoints")
    if not checkpoints:
        fail(f"job {job_id} has no checkpoints yet")
    if checkpoint is None:
        chosen = max(checkpoints, key=lambda c: c["step_number"])
    else:
        found = [c for c in checkpoints if c["step_number"] == checkpoint]
        if not found:
            steps = ", ".join(
                str(c["step_number"]) for c in sorted(checkpoints, key=lambda c: c["step_number"])
            )
            fail(f"job {job_id} has no checkpoint at step {checkpoint} (it has: {steps})")
        chosen = found[0]
    to.mkdir(parents=True, exist_ok=True)
    target = to / f"{job_id}-step-{chosen['step_number']}.tar"
    if target.exists():
        typer.echo(f"{target} is already downloaded")
    else:
        _download(api, f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{chosen['id']}/content", target)
    if extract:
        with tarfile.open(target) as tar:
            tar.extractall(to, filter="data")
        typer.echo(f"extracted into {to / target.stem}")


def _download(api: Api, path: str, target: Path) -> None:
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    console = Console(stderr=True)
    with api.stream(path, headers) as response:
        if response.status_code == 416:  # the .part already holds everything (or more: start over)
            response.read()
            match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("content-range", ""))
            if match and int(match.group(1)) == offset:
                part.rename(target)
                typer.echo(f"downloaded {target} ({offset} bytes)")
                return
            part.unlink()
            return _download(api, path, target)
        check(response)
        if response.status_code == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != offset:
                fail(f"the server answered an unexpected range: {response.headers.get('content-range')!r}")
            total = int(match.group(3))
            mode = "ab"
        else:  # 200: the whole archive (a server without ranges, or a fresh start)
            total = int(response.headers.get("content-length", 0)) or 0
            offset, mode = 0, "wb"
        if offset:
            typer.echo(f"resuming {part.name} at byte {offset} of {total}", err=True)
        with (
            part.open(mode) as out,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                disable=not console.is_terminal,
            ) as progress,
        ):
            task = progress.add_task(target.name, total=total or None, completed=offset)
            for chunk in response.iter_bytes():
                out.write(chunk)
                progress.advance(task, len(chunk))
    size = part.stat().st_size
    if total and size != total:
        fail(f"the download ended early ({size} of {total} bytes in {part}); run the command again to resume")
    part.rename(target)
    typer.echo(f"downloaded {target} ({size} bytes)")


# -- models -----------------------------------------------------------------------------------
