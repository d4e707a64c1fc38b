"""`tunepool files|jobs|models ...`: the REST API from a terminal, for users (not admins).

The server and key come from TUNEPOOL_API_URL / TUNEPOOL_API_KEY, else from `api_url` / `api_key`
in ~/.config/tunepool/config.toml (or config.json; $XDG_CONFIG_HOME is honoured). Read commands
print tables, or the API's JSON with --json. An API error prints `error: <message>` to stderr and
exits 1; so does a server that cannot be reached (naming the URL). Missing settings exit 2.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import httpx
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
from rich.table import Table

files_app = typer.Typer(help="Upload, list and delete training files.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Create, watch, cancel fine-tuning jobs and download their checkpoints.", no_args_is_help=True
)
models_app = typer.Typer(help="Base models and your fine-tuned models.", no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="print the API's JSON instead of a table")
UPLOAD_PATH = typer.Argument(..., help="a JSONL training or validation file")
FROM_YAML_OPTION = typer.Option(None, help="a YAML file with the REST body's fields")
TO_OPTION = typer.Option(Path("."), help="the directory to download into")
TERMINAL = {"succeeded", "failed", "cancelled"}
LOSSES = {"dft": "dft", "sft": "supervised"}


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2))


def when(ts: int | None) -> str:
    from service.cli_tables import when as fmt

    return fmt(ts)


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=250)  # piped: never cut an id short


# -- configuration and HTTP -------------------------------------------------------------------


def config_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tunepool" / "config.toml"


def load_config() -> tuple[str, str]:
    """(API base URL without /v1, API key): the environment first, then the config file."""
    path = config_path()
    stored: dict[str, Any] = {}
    for candidate in (path, path.with_suffix(".json")):
        if candidate.is_file():
            try:
                text = candidate.read_text()
                stored = tomllib.loads(text) if candidate.suffix == ".toml" else json.loads(text)
            except (ValueError, OSError) as err:
                fail(f"cannot read {candidate}: {err}", 2)
            break
    url = os.environ.get("TUNEPOOL_API_URL") or stored.get("api_url")
    key = os.environ.get("TUNEPOOL_API_KEY") or stored.get("api_key")
    missing = [
        f"the API {what} (TUNEPOOL_API_{what.upper()} or {what_key} in {path})"
        for what, what_key, value in (("url", "api_url", url), ("key", "api_key", key))
        if not value
    ]
    if missing:
        fail("missing " + " and ".join(missing), 2)
    base = str(url).rstrip("/")
    base = base.removesuffix("/v1")
    return base, str(key)


class Api:
    """An httpx client on the configured server that turns every failure into one `error:` line."""

    def __init__(self) -> None:
        self.base, key = load_config()
        self.http = httpx.Client(
            base_url=self.base,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(120.0, connect=10.0),
        )

    def _url(self, path: str) -> str:
        return f"{self.base}{path}"

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            fail(f"cannot reach {self._url(path)}: {err or type(err).__name__}")
        check(response)
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    @contextmanager
    def stream(self, path: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        try:
            with self.http.stream("GET", path, headers=headers) as response:
                yield response
        except httpx.TransportError as err:
            fail(f"cannot reach {self._url(path)}: {err or type(err).__name__}")


def error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} from {response.request.url}: {response.text[:500]}"


def check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()  # a streamed response has not read its body yet
        fail(error_message(response))


def _pages(api: Api, path: str, limit: int | None = None, **params: Any) -> list[dict[str, Any]]:
    """Every object of a cursor-paginated list (up to `limit`)."""
    items: list[dict[str, Any]] = []
    after = None
    while True:
        page = api.get(
            path, after=after, limit=100 if limit is None else min(100, limit - len(items)), **params
        )
        items += page["data"]
        if not page.get("has_more") or not page["data"] or (limit is not None and len(items) >= limit):
            return items
        after = page["data"][-1]["id"]


def kv_table(title: str, rows: dict[str, Any]) -> None:
    table = Table("field", "value", title=title, show_header=False)
    for key, value in rows.items():
        if value is not None and value != "":
            table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    _console().print(table)


# -- files ------------------------------------------------------------------------------------


@files_app.command("upload")
def files_upload(
    path: Path = UPLOAD_PATH,
    purpose: str = typer.Option("fine-tune", help="the file's purpose"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Upload a JSONL file; it is validated line by line (a bad file lists its bad lines)."""
    if not path.is_file():
        fail(f"{path}: no such file", 2)
    api = Api()
    with path.open("rb") as f:
        obj = api.request(
            "POST",
            "/v1/files",
            files={"file": (path.name, f, "application/jsonl")},
            data={"purpose": purpose},
        )
    if as_json:
        return print_json(obj)
    kv_table(f"uploaded {obj['id']}", {**obj, "created_at": when(obj.get("created_at"))})


@files_app.command("list")
def files_list(
    limit: int | None = typer.Option(None, help="at most this many files"),
    as_json: bool = JSON_OPTION,
) -> None:
    """List your team's files, newest first."""
    files = _pages(Api(), "/v1/files", limit)
    if as_json:
        return print_json(files)
    table = Table("id", "filename", "purpose", "bytes", "format", "examples", "created (UTC)", title="files")
    for f in files:
        table.add_row(
            f["id"],
            f["filename"],
            f["purpose"],
            str(f["bytes"]),
            f.get("format") or "-",
            str(f.get("n_examples") if f.get("n_examples") is not None else "-"),
            when(f["created_at"]),
        )
    _console().print(table)


@files_app.command("delete")
def files_delete(file_id: str, as_json: bool = JSON_OPTION) -> None:
    """Delete a file."""
    obj = Api().request("DELETE", f"/v1/files/{file_id}")
    if as_json:
        return print_json(obj)
    typer.echo(f"deleted {obj['id']}")


# -- jobs -------------------------------------------------------------------------------------


def job_body(
    from_yaml: Path | None,
    model: str | None,
    training_file: str | None,
    validation_file: str | None,
    loss: str | None,
    hyperparameters: dict[str, Any],
    fields: dict[str, Any],
) -> dict[str, Any]:
    """The REST body: the YAML file's fields (the same as the body's), with the options on top."""
    body: dict[str, Any] = {}
    if from_yaml is not None:
        import yaml

        try:
            loaded = yaml.safe_load(from_yaml.read_text())
        except (OSError, yaml.YAMLError) as err:
            fail(f"--from-yaml: cannot read {from_yaml}: {err}", 2)
        if not isinstance(loaded, dict):
            fail(f"--from-yaml: {from_yaml} must hold a mapping of job fields", 2)
        body = loaded
    for key, value in {
        "model": model,
        "training_file": training_file,
        "validation_file": validation_file,
        **fields,
    }.items():
        if value is not None:
            body[key] = value
    method = body.get("method") or {}
    if not isinstance(method, dict):
        fail("method: must be a mapping like {type: dft}", 2)
    old_type = method.get("type") or "dft"
    new_type = LOSSES[loss] if loss else old_type
    hp = dict(((method.get(old_type) or {}).get("hyperparameters")) or {})
    hp |= {k: v for k, v in hyperparameters.items() if v is not None}
    body["method"] = {"type": new_type, **({new_type: {"hyperparameters": hp}} if hp else {})}
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "training_file") if not body.get(k)]
    if missing:
        fail(f"give {' and '.join(missing)} (or put them in --from-yaml)", 2)
    return body


@jobs_app.command("create")
def jobs_create(
    model: str | None = typer.Option(None, help="a base model or one of your fine-tuned models"),
    training_file: str | None = typer.Option(None, help="the training file's id (file-...)"),
    validation_file: str | None = typer.Option(None, help="the validation file's id"),
    loss: str | None = typer.Option(None, help="dft (default) or sft"),
    epochs: int | None = typer.Option(None, help="n_epochs"),
    batch_size: int | None = typer.Option(None, help="sequences per optimizer step"),
    learning_rate: float | None = typer.Option(None, help="peak learning rate"),
    max_steps: int | None = typer.Option(None, help="stop after this many optimizer steps"),
    suffix: str | None = typer.Option(None, help="added to the fine-tuned model's name"),
    pool: str | None = typer.Option(None, help="the GPU pool to run on"),
    priority: int | None = typer.Option(None, help="-100..100, higher first within your team"),
    from_yaml: Path | None = FROM_YAML_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a fine-tuning job (DFT unless --loss sft or the YAML says otherwise)."""
    if loss is not None and loss not in LOSSES:
        fail(f"--loss: {loss!r} is not one of dft, sft", 2)
    body = job_body(
        from_yaml,
        model,
        training_file,
        validation_file,
        loss,
        {
            "n_epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "max_steps": max_steps,
        },
        {"suffix": suffix, "pool": pool, "priority": priority},
    )
    job = Api().request("POST", "/v1/fine_tuning/jobs", json=body)
    if as_json:
        return print_json(job)
    typer.echo(f"created job {job['id']} ({job['method']['type']} on {job['model']}, {job['status']})")
    typer.echo(f"follow it with: tunepool jobs follow {job['id']}")


@jobs_app.command("list")
def jobs_list(
    status: str | None = typer.Option(None, help="only jobs in this status (queued, running, ...)"),
    limit: int = typer.Option(20, help="at most this many jobs"),
    as_json: bool = JSON_OPTION,
) -> None:
    """List your team's jobs, newest first."""
    jobs = _pages(Api(), "/v1/fine_tuning/jobs", limit, status=status)
    if as_json:
        return print_json(jobs)
    table = Table(
        "id", "model", "method", "status", "steps", "created (UTC)", "fine-tuned model", title="jobs"
    )
    for j in jobs:
        p = j["progress"]
        steps = f"{p['steps_completed']}/{p['total_steps'] if p['total_steps'] is not None else '?'}"
        method = j["method"]["type"]
        table.add_row(
            j["id"],
            j["model"],
            method,
            j["status"],
            steps,
            when(j["created_at"]),
            j["fine_tuned_model"] or "-",
        )
    _console().print(table)


@jobs_app.command("get")
def jobs_get(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """Show one job."""
    job = Api().get(f"/v1/fine_tuning/jobs/{job_id}")
    if as_json:
        return print_json(job)
    error = job.get("error")
    kv_table(
        job["id"],
        {
            "status": job["status"],
            "model": job["model"],
            "method": job["method"]["type"],
            "fine_tuned_model": job["fine_tuned_model"],
            "training_file": job["training_file"],
            "validation_file": job["validation_file"],
            "hyperparameters": job["hyperparameters"],
            "progress": job["progress"],
            "queue_position": job.get("queue_position"),
            "pool": job["pool"],
            "priority": str(job["priority"]),
            "attempt": str(job["attempt"]),
            "trained_tokens": job["trained_tokens"],
            "created_at": when(job["created_at"]),
            "finished_at": when(job["finished_at"]) if job["finished_at"] else None,
            "error": f"{error['code']}: {error['message']}" if error else None,
            "result_files": ", ".join(job["result_files"]) or None,
        },
    )


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """Cancel a job (a running one stops after its current step)."""
    job = Api().request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")
    if as_json:
        return print_json(job)
    typer.echo(f"cancel requested: job {job['id']} is {job['status']}")


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


@models_app.command("list")
def models_list(as_json: bool = JSON_OPTION) -> None:
    """List the base models and your team's fine-tuned models."""
    models = Api().get("/v1/models")["data"]
    if as_json:
        return print_json(models)
    table = Table("id", "owned by", "created (UTC)", title="models")
    for m in models:
        table.add_row(m["id"], m["owned_by"], when(m["created"]))
    _console().print(table)
