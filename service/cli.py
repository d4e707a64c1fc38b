"""The `tunepool` command line (placeholder until the control plane lands)."""

import typer

app = typer.Typer(
    help="tunepool: self-hosted DFT/SFT fine-tuning for a shared GPU pool.", no_args_is_help=True
)


@app.command()
def version() -> None:
    """Print the installed tunepool version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("tunepool"))
