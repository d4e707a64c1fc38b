"""The trainer's GPU-node settings through the API (service/hyperparameters.py), on SQLite and
PostgreSQL: accepted and echoed, carried into the trainer's config.json, and refused where the
job's pool has CPU workers only. Bad values and impossible combinations, one request each:
tests/service/test_bad_requests.py."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from service.models import File, Job, Worker
from service.storage import Storage
from tests.service.conftest import ROOT, Stack
from tests.service.helpers import new_file, new_job
from worker.artifacts import training_config
from worker.training.config import parse_config

# A template in the style of Hugging Face's, with transformers' own extensions (loop controls and
# the {% generation %} block that marks assistant tokens).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>{% generation %}"
    "{{ m.content }}<|end|>{% endgeneration %}{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>"
    "{% endif %}{% if loop.index > 1000 %}{% break %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FULL = {  # a full fine-tune with every new setting
    "batch_size": 8,
    "precision": "bf16-pure",
    "gradient_checkpointing": True,
    "micro_batch_size": 2,
    "loss_chunk_size": 256,
    "attn_implementation": "sdpa",
    "packing": True,
    "chat_template": CHAT_TEMPLATE,
    "distributed": "fsdp",
}
QLORA = {  # a QLoRA job on a GPU
    "precision": "bf16-mixed",
    "gradient_checkpointing": False,
    "packing": False,
    "attn_implementation": "flash_attention_2",
    "distributed": "ddp",
    "lora": {"r": 8, "quantize": "nf4"},
}
NEW_FIELDS = (
    "precision", "gradient_checkpointing", "micro_batch_size", "loss_chunk_size", "attn_implementation",
    "packing", "chat_template", "distributed",
)  # fmt: skip


def dft(values: dict[str, Any]) -> dict[str, Any]:
    return {"type": "dft", "dft": {"hyperparameters": values}}


def trainer_config(stack: Stack, job_id: str) -> dict[str, Any]:
    """What the worker writes as config.json for the job (worker/artifacts.py), checked by the
    trainer's own config class."""
    with stack.db.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        files = {f.id: f for f in session.scalars(select(File).where(File.id == job.training_file))}
        config = training_config(job, stack.settings, Storage(stack.settings.artifacts), files)
    parse_config(json.loads(json.dumps(config)))  # raises ConfigError naming any field it refuses
    return config


def test_every_new_setting_is_echoed_and_reaches_the_trainer(stack: Stack) -> None:
    client = stack.team()
    file_id = new_file(client)
    full = new_job(stack, client, file_id, method=dft(FULL))
    hp = full["method"]["dft"]["hyperparameters"]
    assert {k: hp[k] for k in FULL} == FULL, hp
    assert client.get(f"/v1/fine_tuning/jobs/{full['id']}").json()["method"] == full["method"]
    config = trainer_config(stack, full["id"])
    assert {k: config[k] for k in FULL} == FULL and "lora" not in config

    qlora = new_job(stack, client, file_id, method=dft(QLORA))
    hp = qlora["method"]["dft"]["hyperparameters"]
    assert hp["lora"] == {"r": 8, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear",
                          "merge": False, "quantize": "nf4"}  # fmt: skip
    config = trainer_config(stack, qlora["id"])
    assert {k: config[k] for k in QLORA if k != "lora"} == {k: v for k, v in QLORA.items() if k != "lora"}
    assert config["lora"]["quantize"] == "nf4" and config["lora"]["r"] == 8

    # The legacy top-level hyperparameters take them too, and a job that gives none carries none
    # (the trainer's defaults apply): no key, not a null.
    legacy = new_job(stack, client, file_id, method=None, hyperparameters={"packing": True, "batch_size": 4})
    assert legacy["method"]["supervised"]["hyperparameters"]["packing"] is True
    plain = new_job(stack, client, file_id, method=dft({"lora": {"r": 4}}))
    hp = plain["method"]["dft"]["hyperparameters"]
    assert not set(NEW_FIELDS) & set(hp) and "quantize" not in hp["lora"], hp
    assert not set(NEW_FIELDS) & set(trainer_config(stack, plain["id"]))


@contextmanager
def pool_with_workers(stack: Stack, *gpu_names: str) -> Iterator[str]:
    """A declared pool with registered workers of these GPUs ("cpu" for a CPU worker)."""
    pool = stack.declare_pool(f"caps-{secrets.token_hex(4)}")
    ids = [f"test:{pool}:{i}" for i in range(len(gpu_names))]
    with stack.db.session() as session:
        for worker_id, name in zip(ids, gpu_names, strict=True):
            session.add(
                Worker(id=worker_id, pool=pool, hostname="node", gpu_name=name,
                       gpu_memory_bytes=None if name == "cpu" else 141 * 1024**3,
                       started_at=time.time(), last_heartbeat_at=time.time())
            )  # fmt: skip
        session.commit()
    try:
        yield pool
    finally:
        with stack.db.session() as session:
            session.execute(delete(Worker).where(Worker.id.in_(ids)))
            session.commit()


def test_a_pool_of_cpu_workers_refuses_qlora_and_flash_attention(stack: Stack) -> None:
    client = stack.team()
    file_id = new_file(client)
    hp = "method.dft.hyperparameters"
    qlora = dft({"lora": {"quantize": "nf4"}})
    flash = dft({"attn_implementation": "flash_attention_2"})
    with pool_with_workers(stack, "cpu", "cpu") as cpu_pool:
        for method, param, needs in (
            (qlora, f"{hp}.lora.quantize", "QLoRA"),
            (flash, f"{hp}.attn_implementation", "flash_attention_2"),
        ):
            body = {"model": "tiny-test-model", "training_file": file_id, "method": method, "pool": cpu_pool}
            response = client.post("/v1/fine_tuning/jobs", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == param and error["code"] == "unsupported_by_pool", error
            assert needs in error["message"] and "CUDA GPU" in error["message"], error
            assert f"pool {cpu_pool!r} has CPU workers only" in error["message"], error
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        # What a CPU worker runs is still accepted there.
        new_job(stack, client, file_id, pool=cpu_pool, method=dft({"lora": {"r": 4}, "precision": "fp32"}))
    # A GPU among the pool's workers, or no worker registered yet (nothing known): accepted.
    with (
        pool_with_workers(stack, "NVIDIA H200") as gpu_pool,
        pool_with_workers(stack, "cpu", "NVIDIA H200") as mixed,
    ):
        for pool in (gpu_pool, mixed, stack.declare_pool(f"empty-{secrets.token_hex(4)}")):
            for method in (qlora, flash):
                job = new_job(stack, client, file_id, pool=pool, method=method)
                assert job["pool"] == pool and job["status"] == "queued"


def test_the_cli_passes_the_new_settings(stack: Stack, tmp_path: Path) -> None:
    """`tunepool jobs create`: --precision, --micro-batch-size, --gradient-checkpointing, --packing,
    --chat-template FILE and --lora-quantize (merged into the YAML's lora)."""
    client = stack.team()
    file_id = new_file(client)
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    spec = tmp_path / "job.yaml"
    spec.write_text("method:\n  type: dft\n  dft:\n    hyperparameters: {lora: {r: 8}, batch_size: 4}\n")
    env = {**stack.env, "TUNEPOOL_API_URL": stack.url, "TUNEPOOL_API_KEY": client.key,
           "XDG_CONFIG_HOME": str(tmp_path)}  # fmt: skip

    def tunepool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "jobs", "create", "--model", "tiny-test-model",
             "--training-file", file_id, *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    done = tunepool(
        "--from-yaml", str(spec), "--precision", "bf16-mixed", "--micro-batch-size", "2",
        "--gradient-checkpointing", "--no-packing", "--chat-template", str(template),
        "--lora-quantize", "nf4", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    hp = json.loads(done.stdout)["method"]["dft"]["hyperparameters"]
    assert hp["precision"] == "bf16-mixed" and hp["micro_batch_size"] == 2 and hp["batch_size"] == 4
    assert hp["gradient_checkpointing"] is True and hp["packing"] is False
    assert hp["chat_template"] == CHAT_TEMPLATE and hp["lora"]["r"] == 8 and hp["lora"]["quantize"] == "nf4"
    refused = tunepool("--precision", "fp16")
    assert refused.returncode == 1 and "method.dft.hyperparameters.precision" in refused.stderr
    missing = tunepool("--chat-template", str(tmp_path / "missing.jinja"))
    assert missing.returncode == 2 and "--chat-template" in missing.stderr
