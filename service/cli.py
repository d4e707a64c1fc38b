"""The `tunepool` command: serve the API, migrate the database, administer teams and models.

`tunepool admin ...` runs the same functions as /v1/admin (service/teams.py) straight on the
database. A new key is always the last line of stdout: `KEY=$(tunepool admin create-team x | tail -1)`.
User errors (bad settings, unknown team, unreachable database) print one `error: ...` line to
stderr and exit non-zero: 2 for settings and usage, 1 for the rest.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import typer

from service.schemas import MAX_JOB_GPUS, POOL_PATTERN
from service.settings import Settings, SettingsError, load_settings
from service.usercli import files_app, jobs_app, models_app

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(
    help="tunepool: self-hosted DFT/SFT fine-tuning for a shared GPU pool.", no_args_is_help=True
)
admin = typer.Typer(help="Teams, API keys, quotas and the model registry.", no_args_is_help=True)
app.add_typer(admin, name="admin")
app.add_typer(files_app, name="files")  # the user commands: the REST API from a terminal
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as err:
        head, *problems = str(err).splitlines()
        fail(f"{head} " + "; ".join(p.removeprefix("Value error, ") for p in problems if p), 2)


def database_problem(err: Exception) -> str:
    """One line on a database error: not reachable, or not migrated yet."""
    orig = getattr(err, "orig", None) or err
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    if "no such table" in first or ("relation" in first and "does not exist" in first):
        return f"the database has no tunepool tables ({first}); run `tunepool migrate` first"
    if "already exists" in first:
        return f"the database has tables that `tunepool migrate` did not make ({first}); use an empty one"
    return f"database unavailable: {first}"


def _where(settings: Settings) -> str:
    return settings.database_url.split("@")[-1]  # never the password


@contextmanager
def admin_session() -> Iterator[tuple[Settings, Session]]:
    """Settings and a session; AdminError and database errors end the command with one line."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.db import Database
    from service.teams import AdminError

    settings = _settings()
    db = None
    try:
        db = Database(settings)
        with db.session() as session:
            yield settings, session
    except AdminError as err:
        fail(str(err))
    except (SQLAlchemyError, OSError) as err:
        fail(f"{database_problem(err)} ({_where(settings)})")
    finally:
        if db is not None:
            db.dispose()


@app.command()
def version() -> None:
    """Print the installed tunepool version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("tunepool"))


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema to the latest revision (safe to run again)."""
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from service.migrate import current_revision, upgrade

    settings = _settings()
    try:
        upgrade(settings)
        revision = current_revision(settings)
    except CommandError as err:  # e.g. a database at a revision this version does not know
        fail(f"migration failed: {err}")
    except (SQLAlchemyError, OSError) as err:
        fail(f"{database_problem(err)} ({_where(settings)})")
    typer.echo(f"database at the latest revision, {revision} ({_where(settings)})")


@app.command()
def api(
    host: str | None = typer.Option(None, help="interface to listen on (default: TUNEPOOL_API_HOST)"),
    port: int | None = typer.Option(None, help="port (default: TUNEPOOL_API_PORT)"),
) -> None:
    """Serve the REST API with uvicorn."""
    import uvicorn

    from service.http_protocol import protocol_class

    settings = _settings()
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        # httptools, with limits on the size of a request's head and on slow or stalled clients
        http=protocol_class(settings),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # uvicorn: int, takes float
        limit_concurrency=settings.max_connections,  # 503 past it: connections + running requests
        log_level="info",
        access_log=False,  # request lines would carry nothing secret, but keep the log about the service
    )


@app.command()
def worker(
    pool: str = typer.Option("default", help="the pool whose queue this worker serves"),
    gpus: str | None = typer.Option(
        None, help="the node's GPU indices this worker owns, e.g. 0,1,2,3 (none: a CPU node)"
    ),
    gpu: int | None = typer.Option(None, help="one GPU index: the same as --gpus N"),
    slots: int | None = typer.Option(None, help="CPU node: jobs' slots (default 1; a job takes its gpus)"),
) -> None:
    """Run one node's training worker: it owns the node's GPUs (or CPU slots) and runs the jobs
    of a pool that fit them, several side by side."""
    from worker.process import run_worker  # the one CLI command that needs the worker package

    if not re.fullmatch(POOL_PATTERN, pool):
        fail(f"--pool: {pool!r} is not a pool name (lowercase letters, digits, '-', '_')", 2)
    devices = parse_devices(gpus, gpu, slots)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(_settings(), pool, devices, slots or 1)


def parse_devices(gpus: str | None, gpu: int | None, slots: int | None) -> list[int] | None:
    """The GPU indices of `--gpus 0,1,...` or `--gpu N`; None for a CPU node (`--slots`)."""
    if sum(x is not None for x in (gpus, gpu, slots)) > 1:
        fail("give one of --gpus, --gpu and --slots", 2)
    if slots is not None and not 1 <= slots <= MAX_JOB_GPUS:
        fail(f"--slots: from 1 to {MAX_JOB_GPUS}", 2)
    if gpu is not None:
        gpus = str(gpu)
    if gpus is None:
        return None
    try:
        devices = [int(d) for d in gpus.split(",")]
    except ValueError:
        fail(f"--gpus: {gpus!r} is not a list of GPU indices like 0,1,2,3", 2)
    if not devices or any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        fail(f"--gpus: {gpus!r}: distinct GPU indices from 0, like 0,1,2,3", 2)
    return devices


@app.command()
def reconcile(
    loop: bool = typer.Option(False, "--loop", help="run every TUNEPOOL_RECONCILE_EVERY_S until stopped"),
) -> None:
    """Re-queue jobs whose worker died and re-send lost dispatch messages (workers also do this)."""
    import time

    from service.db import Database
    from worker.reconciler import reconcile as reconcile_once

    settings = _settings()
    db = Database(settings)
    while True:
        typer.echo(json.dumps(reconcile_once(db, settings)))
        if not loop:
            return
        time.sleep(settings.reconcile_every_s)


@app.command()
def up(
    host: str | None = typer.Option(None, help="API interface (default: TUNEPOOL_API_HOST)"),
    port: int | None = typer.Option(None, help="API port (default: TUNEPOOL_API_PORT)"),
    pool: str = typer.Option("default", help="the pool of the one worker"),
    gpu: int | None = typer.Option(None, help="GPU index of the worker (none: CPU)"),
) -> None:
    """Migrate, then run the API and one worker (with its reconciler) until Ctrl-C.

    On the embedded defaults (SQLite database and broker under ./.tunepool/) nothing else is
    needed; with TUNEPOOL_DATABASE_URL and TUNEPOOL_BROKER_URL set, the same processes run
    against PostgreSQL and Redis."""
    from service.up import run_stack

    settings = _settings()
    migrate()
    sys.exit(run_stack(settings, host or settings.api_host, port or settings.api_port, pool, gpu))


# -- admin ------------------------------------------------------------------------------------

JSON_OPTION = typer.Option(False, "--json", help="print JSON instead of a table")


def _print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2))


@admin.command("create-team")
def create_team_cmd(
    name: str, is_admin: bool = typer.Option(False, "--admin", help="give its key admin rights")
) -> None:
    """Create a team; its new API key is the last line of the output."""
    from service.teams import create_team

    with admin_session() as (settings, session):
        team, key = create_team(session, settings, name, admin=is_admin)
    typer.echo(
        f"created team {team.name} ({team.id}){' with an admin key' if is_admin else ''}; its API key:"
    )
    typer.echo(key)


@admin.command("create-key")
def create_key_cmd(team: str, is_admin: bool = typer.Option(False, "--admin", help="an admin key")) -> None:
    """Create another API key for TEAM; the key is the last line of the output."""
    from service.teams import new_key, prefix_of

    with admin_session() as (_, session):
        key = new_key(session, team, admin=is_admin)
    typer.echo(f"created {'an admin' if is_admin else 'a'} key {prefix_of(key)} for team {team}:")
    typer.echo(key)


@admin.command("revoke-key")
def revoke_key_cmd(prefix: str = typer.Argument(help="the key's prefix, e.g. tp-AbC12xYz")) -> None:
    """Revoke an API key by its prefix; it stops working at once."""
    from service.teams import revoke_key

    with admin_session() as (_, session):
        record = revoke_key(session, prefix)
    typer.echo(f"revoked key {record.prefix}")


@admin.command("list-keys")
def list_keys_cmd(team: str, as_json: bool = JSON_OPTION) -> None:
    """List TEAM's keys by prefix (the keys themselves are never stored)."""
    from service.admin_schemas import key_object
    from service.teams import list_keys

    with admin_session() as (_, session):
        keys = [key_object(k) for k in list_keys(session, team)]
    if as_json:
        return _print_json([k.model_dump() for k in keys])
    from service.cli_tables import keys_table

    keys_table(keys)


@admin.command("set-quota")
def set_quota_cmd(
    team: str,
    max_running_jobs: int | None = typer.Option(None, help="jobs of the team that may run at once"),
    max_queued_jobs: int | None = typer.Option(None, help="jobs of the team that may wait at once"),
    max_storage_bytes: str | None = typer.Option(None, help="bytes of files: 500000, 10GB, 10GiB or 10G"),
    share_weight: float | None = typer.Option(None, help="the team's weight in fair share (default 1.0)"),
    max_gpus: int | None = typer.Option(
        None, help="GPUs its running jobs may hold over all pools (-1: no limit)"
    ),
    guaranteed_gpus: int | None = typer.Option(
        None, help="GPUs guaranteed to it in --pool (0: none); below it, it reclaims GPUs by preemption"
    ),
    pool: str = typer.Option("default", help="the pool --guaranteed-gpus is for"),
    may_exempt_preemption: bool | None = typer.Option(
        None,
        "--may-exempt-preemption/--may-not-exempt-preemption",
        help="whether its jobs may ask preemptible: false",
    ),
) -> None:
    """Change TEAM's quotas: only the options given change."""
    from service.teams import AdminError, parse_size, set_quota

    given = (
        max_running_jobs, max_queued_jobs, max_storage_bytes, share_weight, max_gpus, guaranteed_gpus,
        may_exempt_preemption,
    )  # fmt: skip
    if all(v is None for v in given):
        fail(
            "give at least one of --max-running-jobs, --max-queued-jobs, --max-storage-bytes, "
            "--share-weight, --max-gpus, --guaranteed-gpus, --may-exempt-preemption",
            2,
        )
    try:
        storage = None if max_storage_bytes is None else parse_size(max_storage_bytes)
    except AdminError as err:
        fail(str(err).replace("max_storage_bytes:", "--max-storage-bytes:"), 2)
    with admin_session() as (_, session):
        t = set_quota(
            session,
            team,
            max_running_jobs=max_running_jobs,
            max_queued_jobs=max_queued_jobs,
            max_storage_bytes=storage,
            share_weight=share_weight,
            max_gpus=max_gpus,
            guaranteed_gpus=guaranteed_gpus,
            pool=pool,
            may_exempt_preemption=may_exempt_preemption,
        )
        from service.models import TeamQuota

        quota = session.get(TeamQuota, (t.id, pool))
    typer.echo(
        f"team {t.name}: max_running_jobs={t.max_running_jobs} max_queued_jobs={t.max_queued_jobs} "
        f"max_storage_bytes={t.max_storage_bytes} share_weight={t.share_weight:g} "
        f"max_gpus={'none' if t.max_gpus is None else t.max_gpus} "
        f"guaranteed_gpus[{pool}]={quota.guaranteed_gpus if quota else 0} "
        f"may_exempt_preemption={str(t.may_exempt_preemption).lower()}"
    )


@admin.command("list-teams")
def list_teams_cmd(as_json: bool = JSON_OPTION) -> None:
    """List teams with their quotas and what they use now."""
    from service.admin_schemas import team_object
    from service.teams import list_teams

    with admin_session() as (_, session):
        teams = [team_object(usage) for usage in list_teams(session)]
    if as_json:
        return _print_json([t.model_dump() for t in teams])
    from service.cli_tables import teams_table

    teams_table(teams)


@admin.command("list-workers")
def list_workers_cmd(as_json: bool = JSON_OPTION) -> None:
    """List the registered workers (one per node): pool, GPU model, slots and free slots, a job
    running there, and how long ago each last sent a heartbeat."""
    import time

    from sqlalchemy import select

    from service.models import Worker

    with admin_session() as (settings, session):
        now = time.time()
        workers = [
            {
                "id": w.id,
                "pool": w.pool,
                "hostname": w.hostname,
                "gpu_name": w.gpu_name,
                "gpu_memory_bytes": w.gpu_memory_bytes,
                "slots": w.slots,
                "free_slots": w.free_slots,
                "a_running_job": w.current_job_id,
                "heartbeat_age_s": round(now - w.last_heartbeat_at, 1),
                "alive": now - w.last_heartbeat_at < settings.lease_s,
            }
            for w in session.scalars(select(Worker).order_by(Worker.pool, Worker.id))
        ]
    if as_json:
        return _print_json(workers)
    from service.cli_tables import workers_table

    workers_table(workers)


@admin.command("add-model")
def add_model_cmd(
    name: str = typer.Argument(help="what a job's `model` will name"),
    source: str = typer.Argument(
        help="absolute path of a model directory or .gguf file under TUNEPOOL_MODEL_ROOTS, as workers see it"
    ),
    pool: str | None = typer.Option(None, help="the pool its jobs go to (default: TUNEPOOL_DEFAULT_POOL)"),
) -> None:
    """Register a base model (or update the source and pool of a registered one)."""
    from service.teams import add_model

    with admin_session() as (settings, session):
        model = add_model(session, settings, name, source, pool)
    typer.echo(f"registered model {model.name} -> {model.source} (pool {model.pool})")


@admin.command("remove-model")
def remove_model_cmd(name: str) -> None:
    """Unregister a base model."""
    from service.teams import remove_model

    with admin_session() as (_, session):
        remove_model(session, name)
    typer.echo(f"removed model {name}")


@admin.command("list-models")
def list_models_cmd(as_json: bool = JSON_OPTION) -> None:
    """List the registered base models."""
    from service.admin_schemas import model_object
    from service.teams import list_models

    with admin_session() as (_, session):
        models = [model_object(m) for m in list_models(session)]
    if as_json:
        return _print_json([m.model_dump() for m in models])
    from service.cli_tables import models_table

    models_table(models)


@admin.command("add-pool")
def add_pool_cmd(
    name: str = typer.Argument(help="the pool's name: a-z 0-9 _ -"),
    description: str | None = typer.Option(None, help="what the pool's nodes are"),
) -> None:
    """Declare a pool jobs may name (or update its description). Registering a model in a pool
    and starting a worker with --pool declare it too."""
    from service.pools import declare_pool

    with admin_session() as (_, session):
        pool = declare_pool(session, name.strip(), "admin", description)
        session.commit()
    typer.echo(f"declared pool {pool.name}")


@admin.command("remove-pool")
def remove_pool_cmd(name: str) -> None:
    """Forget a pool that no registered model and no unfinished job uses."""
    from service.pools import remove_pool

    with admin_session() as (_, session):
        remove_pool(session, name)
    typer.echo(f"removed pool {name}")


@admin.command("list-pools")
def list_pools_cmd(as_json: bool = JSON_OPTION) -> None:
    """List the pools jobs may name."""
    from service.admin_schemas import pool_object
    from service.pools import list_pools

    with admin_session() as (_, session):
        pools = [pool_object(p) for p in list_pools(session)]
    if as_json:
        return _print_json([p.model_dump() for p in pools])
    from service.cli_tables import pools_table

    pools_table(pools)


if __name__ == "__main__":
    sys.exit(app())
