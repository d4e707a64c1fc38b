"""Out of memory is handled, not fatal: under a real memory limit (RLIMIT_AS on CPU), a micro-batch
that does not fit is halved until one does, with the same result as an unconstrained run; a run
that cannot fit one sequence fails in its first minute saying what would fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.worker.training.conftest import build_tokenizer, write_jsonl
from tests.worker.training.test_distributed import assert_same_weights
from tests.worker.training.test_resume import final_weights

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with eager attention: its [B, heads, T, T] attention weights make activation
    memory grow with the micro-batch, tens of MB at 8 x 512 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("oom-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_config(tmp_path: Path, name: str, model: Path) -> Path:
    train = tmp_path / "train.jsonl"
    if not train.exists():  # 16 long prompt/completion examples (~500 tokens)
        rows = [
            {"prompt": "the cat sat on the mat. " * (40 + i), "completion": f" {i} + {i} = {2 * i}."}
            for i in range(16)
        ]
        write_jsonl(train, rows)
    config = {
        "model": str(model), "loss": "dft", "train_file": str(train), "output_dir": str(tmp_path / name),
        "batch_size": 8, "micro_batch_size": 8, "max_steps": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0,
        "max_seq_length": 1024, "attn_implementation": "eager", "device": "cpu", "seed": 5,
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def limited(config: Path, budget: int) -> subprocess.CompletedProcess[str]:
    # One thread and one malloc arena: the address space grows with tensors, not with thread pools.
    # Every block of 64 KiB or more mapped on its own and unmapped when freed: glibc's heap would
    # otherwise keep freed activations in its address space by amounts that depend on allocation
    # order (it once made a run that fits 4 sequences fail at 1 in CI).
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "tests.worker.training.limit_runner", str(config), "--budget", str(budget)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def events(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "events.jsonl").read_text().splitlines()]


def test_a_micro_batch_that_does_not_fit_is_halved_to_the_same_result(tmp_path: Path, model: Path) -> None:
    free = limited(write_config(tmp_path, "free", model), 1 << 40)  # no practical limit
    assert free.returncode == 0, free.stderr[-3000:]
    run = limited(write_config(tmp_path, "tight", model), 160 << 20)  # 4 sequences fit, 8 do not
    assert run.returncode == 0, run.stderr[-3000:]
    halvings = [
        e for e in events(tmp_path / "tight") if e["message"].startswith("out of memory with micro-batch")
    ]
    assert halvings and "retrying with" in halvings[0]["message"], run.stderr[-2000:]
    plan = json.loads((tmp_path / "tight" / "memory_plan.json").read_text())
    assert 1 <= plan["micro_batch_size"] < 8
    assert_same_weights(final_weights(tmp_path / "free"), final_weights(tmp_path / "tight"))


def test_a_run_that_cannot_fit_one_sequence_fails_at_once_saying_what_would(
    tmp_path: Path, model: Path
) -> None:
    t0 = time.monotonic()
    run = limited(write_config(tmp_path, "none", model), 1 << 20)
    assert run.returncode == 3, run.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    assert "out of memory with one sequence" in run.stderr and "gradient_checkpointing: true" in run.stderr
    assert not (tmp_path / "none" / "metrics.jsonl").read_text().strip()  # it never started a step


def test_sharded_out_of_memory_restarts_with_a_smaller_micro_batch(tmp_path: Path, model: Path) -> None:
    """Under FSDP a rank that runs out of memory cannot retry alone (the others wait in a collective):
    it saves the halved size and the group exits; started again (the worker does it at once), the
    job goes on at that size, to the result of an unconstrained run."""
    free = limited(write_config(tmp_path, "free", model), 1 << 40)
    assert free.returncode == 0, free.stderr[-3000:]
    config = write_config(tmp_path, "sharded", model)
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }  # fmt: skip
    budget = 260 << 20  # 8 sequences per rank do not fit, 4 do
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "tests.worker.training.limit_runner", str(config), "--budget", str(budget),
    ]  # fmt: skip
    sizes = []
    for _ in range(4):
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if run.returncode == 0:
            break
        assert "the job restarts with" in run.stderr, run.stderr[-3000:]
        sizes.append(json.loads((tmp_path / "sharded" / "memory_plan.json").read_text())["micro_batch_size"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[-1] < 8
    assert_same_weights(final_weights(tmp_path / "free"), final_weights(tmp_path / "sharded"))
