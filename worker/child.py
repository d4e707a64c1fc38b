"""The training child: `python -m worker.child RUN_DIR`, started by the job runner (worker/runner.py).

It runs issue #2's trainer on `RUN_DIR/config.json`, in its own process group, so CUDA never
initialises in the Celery process, a cancel or a lost lease can kill the whole group, and the GPU's
memory is freed when the job ends. It talks to its parent through files only:

- `output/metrics.jsonl`, `output/events.jsonl`, `output/checkpoints/step-N/`: the trainer's own
  outputs, which the parent tails into the database while the run goes on;
- `STOP` (written by the parent): finish the current step and stop, keeping the last checkpoint; when
  it says `checkpoint` (a pause or a preemption), save a checkpoint of that step first;
- `error.json` (written here): why the run failed, as an OpenAI-style error (code, message, param),
  or for a full, read-only or failing disk the errno and the path whose write failed.

A job on K GPUs runs `torchrun --nproc-per-node K -m worker.child RUN_DIR`: every rank runs this
module and rank 0 alone writes `error.json` (the trainer's own outputs are rank 0's too).

Exit status: 0 finished or stopped on request (`output/summary.json` says which), 3 failed with
`error.json` written, 4 a write failed for want of storage (ENOSPC, EDQUOT, EROFS, EIO; `error.json`
if it could still be written), anything else a crash (the parent reports the log's last lines).
On a full disk the log may stay empty: everything here that writes is allowed to fail.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from worker.storage_space import storage_errno

EXIT_FAILED = 3
EXIT_STORAGE = 4
STOP_FILE = "STOP"
STOP_CHECKPOINT = "checkpoint"  # in the STOP file: checkpoint the current step before stopping
ERROR_FILE = "error.json"
CONFIG_FILE = "config.json"


def classify(err: BaseException) -> dict[str, Any] | None:
    """The OpenAI-style error of a failure we understand; None for anything else (internal_error)."""
    from worker.training.memory import out_of_memory_error

    oom = out_of_memory_error(err)  # first: the imports below need memory too
    if oom is not None:
        message = str(oom) or "the training process ran out of memory"
        return {"code": "out_of_memory", "message": f"Out of memory: {message}", "param": None}
    from worker.training.config import ConfigError
    from worker.training.data import TemplateError
    from worker.training.errors import InvalidDataError, UnusableDataError
    from worker.training.formats import DataFormatError
    from worker.training.model import ModelLoadError

    param = {"train_file": "training_file", "validation_file": "validation_file"}
    if isinstance(err, InvalidDataError | UnusableDataError):
        field = param.get(err.field, "training_file")
        # The trainer names its own config field; the job's user knows the API's name for it.
        message = str(err).replace(f"{err.field}:", f"{field}:", 1)
        return {"code": "invalid_training_file", "message": message, "param": field}
    if isinstance(err, DataFormatError):
        return {"code": "invalid_training_file", "message": str(err), "param": "training_file"}
    if isinstance(err, ModelLoadError | TemplateError):
        return {"code": "invalid_model", "message": str(err), "param": "model"}
    if isinstance(err, ConfigError):
        return {"code": "invalid_hyperparameters", "message": str(err), "param": "hyperparameters"}
    return None


def read_error(run_dir: Path) -> dict[str, Any] | None:
    """What `error.json` says, or None when there is none (or it cannot be read)."""
    try:
        error = json.loads((run_dir / ERROR_FILE).read_text())
    except (OSError, ValueError):
        return None
    return error if isinstance(error, dict) else None


def _write_error(run_dir: Path, error: dict[str, Any]) -> bool:
    tmp = run_dir / f".{ERROR_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(error))
        os.replace(tmp, run_dir / ERROR_FILE)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False


def _storage_failure(run_dir: Path, output_dir: Path, number: int, path: str | None) -> int:
    """Free what the failed save took (a half-written checkpoint is never resumed from: it has no
    marker and is not renamed into place), then tell the parent what failed, as far as disk allows."""
    with contextlib.suppress(Exception):
        from worker.training.checkpoint import remove_partial_checkpoints

        remove_partial_checkpoints(output_dir)
    with contextlib.suppress(OSError):
        traceback.print_exc()
    _write_error(run_dir, {"storage": {"errno": errno.errorcode.get(number, "EIO"), "path": path}})
    return EXIT_STORAGE


def _stop_keeps_step(stop_file: Path) -> bool:
    try:
        return STOP_CHECKPOINT in stop_file.read_text()
    except OSError:
        return False


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    stop_file = run_dir / STOP_FILE
    output_dir = run_dir / "output"
    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun's; a single process is rank 0
    trainer: Any = None
    try:
        from worker.training.config import TrainingConfig
        from worker.training.trainer import Trainer

        config = TrainingConfig.model_validate(json.loads((run_dir / CONFIG_FILE).read_text()))
        output_dir = config.output_dir
        trainer = Trainer(
            config, should_stop=stop_file.exists, checkpoint_on_stop=lambda: _stop_keeps_step(stop_file)
        )
        trainer.setup()
        result = trainer.train()
        with contextlib.suppress(OSError):  # the run is complete: a full log must not fail it
            print(f"run {result.status}: {result.step}/{result.total_steps} steps", flush=True)
        return 0
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        storage = storage_errno(err)
        if storage is not None:
            return _storage_failure(run_dir, output_dir, *storage) if main_rank else EXIT_STORAGE
        with contextlib.suppress(OSError):
            traceback.print_exc()
        error = classify(err)
        if error is None or not main_rank:
            return 1
        return EXIT_FAILED if _write_error(run_dir, error) else 1
    finally:
        if trainer is not None:
            with contextlib.suppress(Exception):
                trainer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
