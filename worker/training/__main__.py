"""Standalone training: `python -m worker.training CONFIG.yaml`.

On several GPUs of one node: `torchrun --nproc-per-node K -m worker.training CONFIG.yaml` (rank 0
shows progress and writes the outputs; see distributed.py).

Shows a progress bar (step/total, loss, NLL, tokens/s, ETA) on a terminal, one line per step
otherwise, and ends with a summary. Exit status: 0 done, 1 training failed, 2 bad config, data
or model (the message names the field or line), 130 interrupted (Ctrl-C; resumable).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from worker.training.config import ConfigError, load_config
from worker.training.data import TemplateError
from worker.training.formats import DataFormatError
from worker.training.memory import OutOfMemory
from worker.training.model import ModelLoadError
from worker.training.trainer import Trainer, TrainingError


def _metrics_text(row: dict[str, Any]) -> str:
    text = (
        f"loss {row['loss']:.4g}  nll {row['nll']:.4f}  acc {row['token_accuracy']:.3f}  "
        f"{row['tokens_per_sec']:.0f} tok/s"
    )
    if "valid_loss" in row:
        text += f"  valid_nll {row['valid_nll']:.4f}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training config, .yaml/.yml or .json")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the job
    interactive = console.is_terminal and main_rank

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not interactive,
    )
    task = progress.add_task("train", total=None, metrics="loading model and data")

    def on_metrics(row: dict[str, Any]) -> None:
        text = _metrics_text(row)
        progress.update(task, completed=row["step"], total=row["total_steps"], metrics=text)
        if not interactive:
            print(
                f"step {row['step']}/{row['total_steps']}  {text}  elapsed {row['elapsed_s']:.0f}s",
                file=sys.stderr,
            )

    def on_event(row: dict[str, Any]) -> None:
        if row["level"] != "info" or not interactive:
            progress.console.print(
                f"{row['level']}: {row['message']}", markup=False, highlight=False, soft_wrap=True
            )

    trainer: Trainer | None = None
    try:
        config = load_config(args.config)
        trainer = Trainer(config, on_metrics=on_metrics, on_event=on_event)
        with progress:
            trainer.setup()
            progress.update(task, completed=trainer.step, total=trainer.total_steps, metrics="")
            result = trainer.train()
    except (ConfigError, DataFormatError, ModelLoadError, TemplateError, TrainingError) as err:
        if main_rank:
            console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        return 2
    except OutOfMemory as err:
        if main_rank:
            console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        return 1
    except KeyboardInterrupt:
        if main_rank:
            console.print("interrupted: run the same command again to resume from the last checkpoint")
        return 130
    finally:
        if trainer is not None:
            trainer.close()
    if not main_rank:
        return 0

    s = result.summary
    final = s["final"]
    lines = [
        f"{s['status']}: {s['steps']}/{s['total_steps']} steps, {s['trained_tokens']:,} trained tokens, "
        f"{s['elapsed_s']:.0f}s",
        f"loss mode {s['loss_mode']}: final loss {final.get('loss', float('nan')):.4g}, "
        f"nll {final.get('nll', float('nan')):.4f}, token accuracy {final.get('token_accuracy', 0.0):.3f}",
        f"padding {100 * s['padding_fraction']:.1f}% of processed tokens; examples: {s['examples']} used, "
        f"{s['truncated_examples']} truncated, {s['dropped_examples']} dropped; "
        f"{s['skipped_steps']} steps skipped",
    ]
    if "valid_nll" in final:
        lines.append(
            f"validation: loss {final['valid_loss']:.4g}, nll {final['valid_nll']:.4f}, "
            f"token accuracy {final['valid_token_accuracy']:.3f}"
        )
    lines.append(f"checkpoint: {s['checkpoint']}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
