"""`tunepool files ...` and `tunepool models list`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from service.usercli.common import (
    JSON_OPTION,
    UPLOAD_PATH,
    Api,
    _console,
    _pages,
    fail,
    files_app,
    kv_table,
    models_app,
    print_json,
    when,
)


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
