"""The `tunepool` command: serve the API, migrate the database, administer teams and models."""

from __future__ import annotations

import sys

import typer

from service.settings import SettingsError, load_settings

app = typer.Typer(
    help="tunepool: self-hosted DFT/SFT fine-tuning for a shared GPU pool.", no_args_is_help=True
)
admin = typer.Typer(help="Teams, API keys, quotas and the model registry.", no_args_is_help=True)
app.add_typer(admin, name="admin")


def _settings():  # type: ignore[no-untyped-def]
    try:
        return load_settings()
    except SettingsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print the installed tunepool version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("tunepool"))


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema to the latest revision."""
    from service.migrate import upgrade

    settings = _settings()
    upgrade(settings)
    typer.echo(f"database at the latest revision ({settings.database_url.split('@')[-1]})")


@app.command()
def api(
    host: str = typer.Option(None, help="interface to listen on (default: TUNEPOOL_API_HOST)"),
    port: int = typer.Option(None, help="port (default: TUNEPOOL_API_PORT)"),
) -> None:
    """Serve the REST API with uvicorn."""
    import uvicorn

    settings = _settings()
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level="info",
        access_log=False,
    )


@admin.command("create-team")
def create_team_cmd(
    name: str, is_admin: bool = typer.Option(False, "--admin", help="give its key admin rights")
) -> None:
    """Create a team; its new API key is the last line of the output."""
    from service.db import Database
    from service.teams import AdminError, create_team

    settings = _settings()
    db = Database(settings)
    try:
        with db.session() as session:
            team, key = create_team(session, settings, name, admin=is_admin)
    except AdminError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"created team {team.name} ({team.id}){' with an admin key' if is_admin else ''}; its API key:"
    )
    typer.echo(key)


if __name__ == "__main__":
    sys.exit(app())
