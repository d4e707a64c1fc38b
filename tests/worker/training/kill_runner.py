"""Run a training config and SIGKILL this very process at a chosen point (used by test_trainer).

python -m tests.worker.training.kill_runner CONFIG --after-step N   # killed once step N is logged
python -m tests.worker.training.kill_runner CONFIG --in-save N      # killed half-way through saving step N
python -m tests.worker.training.kill_runner CONFIG --mid-step N --rank R
    # rank R killed in the middle of step N's forward passes (under torchrun; a single process is rank 0)
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

from worker.training import checkpoint
from worker.training.config import load_config
from worker.training.trainer import Trainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--after-step", type=int)
    parser.add_argument("--in-save", type=int)
    parser.add_argument("--mid-step", type=int)
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args()

    def on_metrics(row: dict[str, Any]) -> None:
        if row["step"] == args.after_step:
            die()

    real_fsync_tree = checkpoint._fsync_tree

    def fsync_then_die(path: Path) -> None:
        # the files of the new checkpoint are written, the rename has not happened yet
        real_fsync_tree(path)
        if path.name.endswith(f"{args.in_save:06d}"):
            die()

    if args.in_save is not None:
        checkpoint._fsync_tree = fsync_then_die
    trainer = Trainer(load_config(args.config), on_metrics=on_metrics)
    trainer.setup()
    if args.mid_step is not None and int(os.environ.get("RANK", "0")) == args.rank:
        forward = trainer.objective.forward

        def forward_then_die(*a: Any, **k: Any) -> Any:
            if trainer.step == args.mid_step - 1 and trainer.objective.training:
                # the other ranks are on their way into this step's collectives
                (trainer.config.output_dir / "killed_at").write_text(repr(time.time()))
                die()
            return forward(*a, **k)

        trainer.objective.forward = forward_then_die  # type: ignore[method-assign]
    trainer.train()
    raise SystemExit("the kill point was never reached")


if __name__ == "__main__":
    main()
