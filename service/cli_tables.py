"""Readable tables (rich) for `tunepool admin list-*`; `--json` prints the API's objects instead."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from service.admin_schemas import ApiKeyObject, PoolObject, RegisteredModelObject, TeamObject


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, as storage quotas are usually thought of)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _show(table: Table) -> None:
    console = Console()
    if not console.is_terminal:  # piped or captured: never cut a name or an id short
        console = Console(width=250)
    console.print(table)


def teams_table(teams: list[TeamObject]) -> None:
    table = Table("team", "id", "running", "queued", "storage", "share", "created (UTC)", title="teams")
    for t in teams:
        q, u = t.quota, t.usage
        table.add_row(
            t.name,
            t.id,
            f"{u.running_jobs}/{q.max_running_jobs}",
            f"{u.queued_jobs}/{q.max_queued_jobs}",
            f"{human_bytes(u.stored_bytes)}/{human_bytes(q.max_storage_bytes)}",
            f"{q.share_weight:g}",
            when(t.created_at),
        )
    _show(table)


def workers_table(workers: list[dict[str, Any]]) -> None:
    table = Table("worker", "pool", "GPU", "slots free", "a running job", "heartbeat", title="workers")
    for w in workers:
        beat = f"{w['heartbeat_age_s']:g} s ago" + ("" if w["alive"] else " (lost)")
        free = f"{w['free_slots']}/{w['slots']}"
        table.add_row(w["id"], w["pool"], w["gpu_name"], free, w["a_running_job"] or "", beat)
    _show(table)


def keys_table(keys: list[ApiKeyObject]) -> None:
    table = Table("prefix", "admin", "created (UTC)", "last used", "revoked", title="API keys")
    for k in keys:
        table.add_row(
            k.prefix,
            "yes" if k.is_admin else "",
            when(k.created_at),
            when(k.last_used_at),
            when(k.revoked_at),
        )
    _show(table)


def models_table(models: list[RegisteredModelObject]) -> None:
    table = Table("model", "pool", "source", "created (UTC)", title="registered models")
    for m in models:
        table.add_row(m.id, m.pool, m.source, when(m.created))
    _show(table)


def pools_table(pools: list[PoolObject]) -> None:
    table = Table("pool", "declared by", "description", "created (UTC)", title="pools")
    for p in pools:
        table.add_row(p.id, p.declared_by, p.description or "", when(p.created_at))
    _show(table)
