"""Jobs that fail, through real processes: a model that cannot load, a training file with nothing
that fits, a trainer that runs out of memory. Each ends `failed` with the OpenAI-style `error`
(code, message, param) on the job object, and the same worker goes on to run the next job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import System
from tests.service.conftest import ROOT
from tests.worker.training.conftest import chat_rows

# The valid job's settings (the fixture's defaults): the memory limit is measured on this job.
VALID = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 128}
# Room above the valid job's measured peak address space: plenty for another small job, far less
# than the large job below needs (more than 6 GiB when measured).
HEADROOM = 1024**3
# RLIMIT_AS limits host memory: the jobs train on the CPU even where a GPU is visible.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
# Runs the real training child (worker.child) on a small job and prints its exit status and the
# peak size of its address space (VmPeak), which is what RLIMIT_AS limits.
MEASURE = """
import sys
from worker.child import main
code = main([sys.argv[1]])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(code, int(status["VmPeak"].split()[0]) * 1024)
"""


@pytest.fixture(scope="module")
def memory_limit(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """A limit that a small job (imports, model, training, checkpoint) fits in with room to spare."""
    run = tmp_path_factory.mktemp("measure")
    train = run / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    config = {"model": str(tiny_base), "train_file": str(train), "output_dir": str(run / "output"), **VALID}
    (run / "config.json").write_text(json.dumps(config))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(run)],
        cwd=ROOT,
        env={**os.environ, **CPU_ONLY},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    code, peak = (int(x) for x in out.stdout.split()[-2:])
    assert code == 0, out.stdout[-3000:]
    return peak + HEADROOM


def large_rows(n: int, words: int) -> bytes:
    """`n` conversations of about 2 * `words` tokens each (" x" is two tokens of the tiny tokenizer)."""
    rows = [
        {"messages": [{"role": "user", "content": " x" * words}, {"role": "assistant", "content": "ok"}]}
        for _ in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_failed_jobs_report_their_error_and_the_worker_takes_the_next_job(
    system: System, memory_limit: int, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not JSON")
    system.stack.add_model("broken", str(broken))
    worker = system.start_worker(env={"TUNEPOOL_JOB_MEMORY_LIMIT_BYTES": str(memory_limit), **CPU_ONLY})
    client = system.team()
    file_id = system.new_file(client, n=16)
    large_file = system.new_file(client, content=large_rows(8, 8192))

    # Queued together: the worker takes them one after the other, oldest first.
    bad_model = system.submit(client, file_id, model="broken", hyperparameters={"max_steps": 1})
    too_long = system.submit(client, file_id, hyperparameters={"max_seq_length": 8, "overlength": "drop"})
    # The default, overlength=truncate, keeps an example's first 8 tokens: here part of each prompt, no
    # trained token, so every example is dropped all the same and the job must fail alike.
    too_long_truncated = system.submit(client, file_id, hyperparameters={"max_seq_length": 8})
    # Sequences of ~16,400 tokens with eager attention: its [heads, T, T] weights alone are 4 GiB
    # for one sequence, over the limit however small the micro-batch is made.
    too_big = system.submit(
        client,
        large_file,
        hyperparameters={
            "batch_size": 8, "max_seq_length": 16512, "max_steps": 1, "attn_implementation": "eager"
        },
    )  # fmt: skip
    valid = system.submit(client, file_id, hyperparameters=VALID)

    def failed(job: dict[str, Any]) -> dict[str, Any]:
        done = system.wait(client, job["id"])
        events = system.events(client, job["id"])
        assert done["status"] == "failed", (done, events, system.worker_logs())
        assert done["fine_tuned_model"] is None and done["finished_at"] is not None
        assert any(e.startswith("Job failed: ") for e in events), events
        return dict(done["error"])

    error = failed(bad_model)
    assert error["code"] == "invalid_model" and error["param"] == "model", error
    assert error["message"].startswith(f"model: cannot load the model directory {broken}: "), error
    assert "config.json" in error["message"], error

    error = failed(too_long)
    assert error["code"] == "invalid_training_file" and error["param"] == "training_file", error
    assert "all 16 examples are longer than max_seq_length=8" in error["message"], error
    assert error["message"].startswith("training_file: "), error

    error = failed(too_long_truncated)
    assert error["code"] == "invalid_training_file" and error["param"] == "training_file", error
    assert "all 16 examples are longer than max_seq_length=8 or have no trained" in error["message"], error
    warnings = [e for e in system.events(client, too_long_truncated["id"]) if "16 dropped" in e]
    assert warnings and "overlength=truncate" in warnings[0], system.events(client, too_long_truncated["id"])

    error = failed(too_big)
    assert error["code"] == "out_of_memory" and error["param"] is None, error
    assert error["message"].startswith("Out of memory: out of memory with one sequence"), error
    assert "what would fit: gradient_checkpointing: true" in error["message"], error
    # It failed in its preflight, after the model and all of the data had loaded under the limit,
    # and after halving its micro-batch down to one sequence.
    events = system.events(client, too_big["id"])
    assert any(e.startswith("train_file: 8 chat examples") for e in events), events
    assert sum("out of memory with micro-batch" in e for e in events) == 3, events  # 8 -> 4 -> 2 -> 1

    # The same worker, still alive and under the same limit, runs the next job to the end.
    done = system.wait(client, valid["id"])
    assert done["status"] == "succeeded", (done, system.events(client, valid["id"]), system.worker_logs())
    assert done["error"] is None and done["progress"]["steps_completed"] == 4
    assert worker.poll() is None, system.worker_logs()
    started = {
        job["id"]: [e for e in system.events(client, job["id"]) if "started on worker" in e]
        for job in (bad_model, too_long, too_long_truncated, too_big, valid)
    }
    workers = {e.split("started on worker ")[1].split()[0] for lines in started.values() for e in lines}
    assert all(len(lines) == 1 for lines in started.values()) and len(workers) == 1, started
    assert workers.pop().endswith(f":{worker.pid}"), started  # worker ids end with the process id
