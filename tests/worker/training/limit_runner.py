"""Train a config under a memory limit that starts where the real work starts (used by test_memory).

python -m tests.worker.training.limit_runner CONFIG --budget BYTES

After the model, the data and the optimizer state are loaded (and one short warm-up pass has
started torch's thread pools), the process's address space is capped at what it uses then plus
BYTES (RLIMIT_AS), so the preflight and the steps run under a real limit: allocations beyond it
fail as they would on a full GPU. Exit status: 0 done, 3 out of memory (the message on stderr).
"""

from __future__ import annotations

import argparse
import resource
import sys

from worker.training import memory
from worker.training.config import load_config
from worker.training.trainer import Trainer


def address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--budget", type=int, required=True)
    args = parser.parse_args()
    trainer = Trainer(load_config(args.config))
    preflight = trainer.preflight

    def limited_preflight() -> None:
        batch = trainer.train_data.examples[:1]
        from worker.training.data import collate

        trainer.objective(collate(batch, trainer.pad_id), 1.0).loss.backward()  # warm-up, discarded
        trainer.optimizer.zero_grad(set_to_none=True)
        limit = address_space() + args.budget
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        preflight()

    trainer.preflight = limited_preflight  # type: ignore[method-assign]
    try:
        trainer.setup()
        trainer.train()
    except memory.OutOfMemory as err:
        print(f"out of memory: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
