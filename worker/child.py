"""The training child: `python -m worker.child RUN_DIR`, started by the job runner (worker/runner.py).

It runs issue #2's trainer on `RUN_DIR/config.json`, in its own process group, so CUDA never
initialises in the Celery process, a cancel or a lost lease can kill the whole group, and the GPU's
memory is freed when the job ends. It talks to its parent through files only:

- `output/metrics.jsonl`, `output/events.jsonl`, `output/checkpoints/step-N/`: the trainer's own
  outputs, which the parent tails into the database while the run goes on;
- `STOP` (written by the parent): finish the current step and stop, keeping the last checkpoint;
- `error.json` (written here): why the run failed, as an OpenAI-style error (code, message, param).

Exit status: 0 finished or stopped on request (`output/summary.json` says which), 3 failed with
`error.json` written, anything else a crash (the parent reports the log's last lines).
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

EXIT_FAILED = 3
STOP_FILE = "STOP"
ERROR_FILE = "error.json"
CONFIG_FILE = "config.json"
_CPU_ALLOCATOR_OOM = r"DefaultCPUAllocator: (can't allocate memory|not enough memory)"


def _out_of_memory(err: BaseException) -> BaseException | None:
    """The out-of-memory error in `err` or in what caused it, else None.

    Under a memory limit (RLIMIT_AS) a failed allocation is a MemoryError in Python, torch's
    OutOfMemoryError on a GPU, but a plain RuntimeError from torch's CPU allocator ("DefaultCPUAllocator:
    can't allocate memory"); and it may surface wrapped, e.g. as the ImportError of a module that was
    being imported when memory ran out.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or type(current).__name__ == "OutOfMemoryError":
            return current
        if isinstance(current, RuntimeError) and re.search(_CPU_ALLOCATOR_OOM, str(current)):
            return current
        current = current.__cause__ or current.__context__
    return None


def classify(err: BaseException) -> dict[str, Any] | None:
    """The OpenAI-style error of a failure we understand; None for anything else (internal_error)."""
    oom = _out_of_memory(err)  # first: the imports below need memory too
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


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    stop_file = run_dir / STOP_FILE
    try:
        from worker.training.config import TrainingConfig
        from worker.training.trainer import Trainer

        config = TrainingConfig.model_validate(json.loads((run_dir / CONFIG_FILE).read_text()))
        trainer = Trainer(config, should_stop=stop_file.exists)
        trainer.setup()
        result = trainer.train()
        print(f"run {result.status}: {result.step}/{result.total_steps} steps", flush=True)
        return 0
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        traceback.print_exc()
        error = classify(err)
        if error is None:
            return 1
        tmp = run_dir / f".{ERROR_FILE}.tmp"
        tmp.write_text(json.dumps(error))
        os.replace(tmp, run_dir / ERROR_FILE)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
