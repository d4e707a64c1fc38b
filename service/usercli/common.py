"""Shared by the user commands: settings, the HTTP client, errors, output helpers."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer
from rich.console import Console
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
