"""Bad requests, through the real API on SQLite and PostgreSQL: each row is one request with the 4xx
it must get and the `param` it must name (null where the body as a whole is at fault, as in
OpenAI's answers), and each leaves the team's state as it was: no job, event or file created, no job
changed, quotas unchanged, nothing new in storage.

Elsewhere: malformed multipart uploads, two files in one upload among them (tests/service/
test_files.py::test_malformed_requests), another team's ids on every route (test_isolation.py),
bad training data (test_bad_data.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from service.models import File, Job, JobEvent, Team
from tests.service.conftest import Stack, TeamClient, chat_jsonl
from tests.service.helpers import ensure_model, new_file, new_job, set_job

JOBS = "/v1/fine_tuning/jobs"
HP = "method.dft.hyperparameters"  # the param prefix of hp() rows


@dataclass
class Ctx:
    """One row's team, its valid file, and the state snapshot taken just before the bad request."""

    stack: Stack
    client: TeamClient
    file_id: str
    model: str
    before: tuple[Any, ...] = ()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.before = snapshot(self.stack, self.client)  # after the row's own set-up, if any
        return self.client.request(method, path, **kwargs)

    def create(self, change: dict[str, Any], **kwargs: Any) -> httpx.Response:
        body = {"model": self.model, "training_file": self.file_id, **change}
        return self.request("POST", JOBS, json=body, **kwargs)


Send = Callable[[Ctx], httpx.Response]


def snapshot(stack: Stack, client: TeamClient) -> tuple[Any, ...]:
    """What a bad request must not change: the team's jobs, events, files, quotas, and storage."""
    team = client.team_id
    with stack.db.session() as session:
        jobs = session.execute(
            select(Job.id, Job.status, Job.cancel_requested).where(Job.team_id == team).order_by(Job.pk)
        ).all()
        events = session.scalar(
            select(func.count())
            .select_from(JobEvent)
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.team_id == team)
        )
        files = session.execute(
            select(File.id, File.bytes).where(File.team_id == team).order_by(File.pk)
        ).all()
        quotas = session.execute(
            select(Team.max_running_jobs, Team.max_queued_jobs, Team.max_storage_bytes).where(Team.id == team)
        ).one()
    return tuple(jobs), events, tuple(files), tuple(quotas), tuple(stack.storage_files())


def body(**change: Any) -> Send:
    return lambda ctx: ctx.create(change)


def hp(**values: Any) -> Send:
    return body(method={"type": "dft", "dft": {"hyperparameters": values}})


def raw(content: bytes, content_type: str | None, path: str = JOBS) -> Send:
    # httpx adds no Content-Type to raw content: none given is none sent
    return lambda ctx: ctx.request(
        "POST", path, content=content, headers={"Content-Type": content_type} if content_type else {}
    )


def another_teams_file(ctx: Ctx) -> httpx.Response:
    return ctx.create({"training_file": new_file(ctx.stack.team())})


def a_deleted_file(ctx: Ctx) -> httpx.Response:
    gone = new_file(ctx.client)
    assert ctx.client.delete(f"/v1/files/{gone}").status_code == 200
    return ctx.create({"training_file": gone})


def cancel_a_finished_job(status: str) -> Send:
    def send(ctx: Ctx) -> httpx.Response:
        job = new_job(ctx.stack, ctx.client, ctx.file_id)
        set_job(ctx.stack, job["id"], status=status, finished_at=1)
        return ctx.request("POST", f"{JOBS}/{job['id']}/cancel")

    return send


def a_header_of(size: int) -> Send:
    return lambda ctx: ctx.request("GET", "/v1/files", headers={"X-Padding": "a" * size})


NO_FILE = "file-doesnotexist"
VALID_BODY = b'{"model": "tiny-test-model", "training_file": "file-x"}'
NESTED = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
# id: (request, status, param, code or None for "not checked")
CATALOGUE: dict[str, tuple[Send, int, str | None, str | None]] = {
    # hyperparameters out of range
    "n_epochs-0": (hp(n_epochs=0), 400, f"{HP}.n_epochs", "invalid_value"),
    "n_epochs-51": (hp(n_epochs=51), 400, f"{HP}.n_epochs", None),
    "batch_size-0": (hp(batch_size=0), 400, f"{HP}.batch_size", None),
    "batch_size-5000": (hp(batch_size=5000), 400, f"{HP}.batch_size", None),
    "learning_rate--1": (hp(learning_rate=-1), 400, f"{HP}.learning_rate", None),
    "learning_rate-0": (hp(learning_rate=0), 400, f"{HP}.learning_rate", None),
    "learning_rate_multiplier-0": (
        hp(learning_rate_multiplier=0),
        400,
        f"{HP}.learning_rate_multiplier",
        None,
    ),
    "warmup_ratio-1.5": (hp(warmup_ratio=1.5), 400, f"{HP}.warmup_ratio", None),
    "warmup_ratio--0.1": (hp(warmup_ratio=-0.1), 400, f"{HP}.warmup_ratio", None),
    "max_seq_length-4": (hp(max_seq_length=4), 400, f"{HP}.max_seq_length", None),
    "max_steps-0": (hp(max_steps=0), 400, f"{HP}.max_steps", None),
    "weight_decay-2": (hp(weight_decay=2), 400, f"{HP}.weight_decay", None),
    "max_grad_norm-0": (hp(max_grad_norm=0), 400, f"{HP}.max_grad_norm", None),
    "checkpoint_every-0": (hp(checkpoint_every=0), 400, f"{HP}.checkpoint_every", None),
    "lora.r-0": (hp(lora={"r": 0}), 400, f"{HP}.lora.r", None),
    "lora.alpha-0": (hp(lora={"alpha": 0}), 400, f"{HP}.lora.alpha", None),
    "lora.dropout-1": (hp(lora={"dropout": 1.0}), 400, f"{HP}.lora.dropout", None),
    "learning_rate-NaN": (  # Python's json reads NaN; no bound lets it through
        raw(
            b'{"model": "m", "training_file": "f", "hyperparameters": {"learning_rate": NaN}}',
            "application/json",
        ),
        400,
        "hyperparameters.learning_rate",
        None,
    ),
    "both-learning-rates": (
        hp(learning_rate=1e-4, learning_rate_multiplier=2),
        400,
        f"{HP}.learning_rate",
        None,
    ),
    "accumulation-not-dividing-batch": (
        hp(batch_size=8, gradient_accumulation_steps=3),
        400,
        f"{HP}.gradient_accumulation_steps",
        None,
    ),
    "eval_every-without-validation": (hp(eval_every=10), 400, f"{HP}.eval_every", None),
    # the trainer's GPU-node settings (service/hyperparameters.py; the pool's GPUs:
    # test_hyperparameters.py): out of range, of the wrong type, in combinations the trainer refuses
    "precision-float32": (hp(precision="float32"), 400, f"{HP}.precision", None),  # the trainer's alias
    "micro_batch_size-0": (hp(micro_batch_size=0), 400, f"{HP}.micro_batch_size", None),
    "micro_batch_size-true": (hp(micro_batch_size=True), 400, f"{HP}.micro_batch_size", None),
    "loss_chunk_size-0": (hp(loss_chunk_size=0), 400, f"{HP}.loss_chunk_size", None),
    "loss_chunk_size-2**20+1": (hp(loss_chunk_size=2**20 + 1), 400, f"{HP}.loss_chunk_size", None),
    "loss_chunk_size-true": (hp(loss_chunk_size=True), 400, f"{HP}.loss_chunk_size", None),
    "attn_implementation-flash": (hp(attn_implementation="flash"), 400, f"{HP}.attn_implementation", None),
    "distributed-deepspeed": (hp(distributed="deepspeed"), 400, f"{HP}.distributed", None),
    "packing-1": (hp(packing=1), 400, f"{HP}.packing", None),  # a boolean, not a number
    "packing-yes": (hp(packing="yes"), 400, f"{HP}.packing", None),
    "gradient_checkpointing-true-string": (
        hp(gradient_checkpointing="true"),
        400,
        f"{HP}.gradient_checkpointing",
        None,
    ),
    "chat_template-empty": (hp(chat_template=""), 400, f"{HP}.chat_template", None),
    "chat_template-200001-characters": (hp(chat_template="x" * 200_001), 400, f"{HP}.chat_template", None),
    "chat_template-a-list": (hp(chat_template=["{{ x }}"]), 400, f"{HP}.chat_template", None),
    "chat_template-unclosed-for": (
        hp(chat_template="{% for m in messages %}{{ m.content }}"),
        400,
        f"{HP}.chat_template",
        None,
    ),
    "chat_template-bad-expression": (hp(chat_template="{{ messages[0 }}"), 400, f"{HP}.chat_template", None),
    "chat_template-unknown-filter": (hp(chat_template="{{ x | nosuch }}"), 400, f"{HP}.chat_template", None),
    "chat_template-break-outside-a-loop": (hp(chat_template="{% break %}"), 400, f"{HP}.chat_template", None),
    "chat_template-nested-50000-deep": (
        hp(chat_template="{{ " + "(" * 50_000 + "1" + ")" * 50_000 + " }}"),
        400,
        f"{HP}.chat_template",
        None,
    ),
    "lora.quantize-int8": (hp(lora={"quantize": "int8"}), 400, f"{HP}.lora.quantize", None),
    "micro_batch_size-with-accumulation": (
        hp(micro_batch_size=2, gradient_accumulation_steps=2),
        400,
        f"{HP}.micro_batch_size",
        None,
    ),
    "micro_batch_size-over-batch_size": (
        hp(batch_size=4, micro_batch_size=8),
        400,
        f"{HP}.micro_batch_size",
        None,
    ),
    "micro_batch_size-over-auto-batch_size": (hp(micro_batch_size=9), 400, f"{HP}.micro_batch_size", None),
    "bf16-pure-with-lora": (hp(precision="bf16-pure", lora={}), 400, f"{HP}.precision", None),
    "lora.quantize-with-fsdp": (
        hp(lora={"quantize": "nf4"}, distributed="fsdp"),
        400,
        f"{HP}.lora.quantize",
        None,
    ),
    "lora-with-fsdp": (hp(lora={"r": 8}, distributed="fsdp"), 400, f"{HP}.distributed", None),
    "legacy-micro_batch_size-with-accumulation": (
        body(hyperparameters={"micro_batch_size": 2, "gradient_accumulation_steps": 2}),
        400,
        "hyperparameters.micro_batch_size",
        None,
    ),
    "supervised-bf16-pure-with-lora": (
        body(
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"precision": "bf16-pure", "lora": {"r": 4}}},
            }
        ),
        400,
        "method.supervised.hyperparameters.precision",
        None,
    ),
    # hyperparameters of the wrong type
    "n_epochs-many": (hp(n_epochs="many"), 400, f"{HP}.n_epochs", None),
    "n_epochs-2.5": (hp(n_epochs=2.5), 400, f"{HP}.n_epochs", None),
    "n_epochs-true": (hp(n_epochs=True), 400, f"{HP}.n_epochs", None),  # not 1
    "batch_size-big": (hp(batch_size="big"), 400, f"{HP}.batch_size", None),
    "batch_size-list": (hp(batch_size=[8]), 400, f"{HP}.batch_size", None),
    "learning_rate-fast": (hp(learning_rate="fast"), 400, f"{HP}.learning_rate", None),
    "lr_scheduler-step": (hp(lr_scheduler="step"), 400, f"{HP}.lr_scheduler", None),
    "overlength-cut": (hp(overlength="cut"), 400, f"{HP}.overlength", None),
    "lora.r-true": (hp(lora={"r": True}), 400, f"{HP}.lora.r", None),
    "lora-a-number": (hp(lora=16), 400, f"{HP}.lora", None),
    "lora.target_modules-a-string": (
        hp(lora={"target_modules": "q_proj"}),
        400,
        f"{HP}.lora.target_modules",
        None,
    ),
    "lora-unknown-key": (hp(lora={"rank": 8}), 400, f"{HP}.lora.rank", None),
    "hyperparameters-unknown-key": (hp(warmup=0.1), 400, f"{HP}.warmup", None),
    "hyperparameters-a-string": (body(hyperparameters="fast"), 400, "hyperparameters", None),
    "hyperparameters-twice": (
        body(hyperparameters={"n_epochs": 2}, method={"type": "dft", "dft": {"hyperparameters": {}}}),
        400,
        "hyperparameters",
        None,
    ),
    "method.type-dpo": (body(method={"type": "dpo"}), 400, "method.type", None),
    "method-other-block": (body(method={"type": "dft", "supervised": {}}), 400, "method", None),
    # the other fields
    "seed--1": (body(seed=-1), 400, "seed", None),
    "seed-2**31": (body(seed=2**31), 400, "seed", None),
    "seed-true": (body(seed=True), 400, "seed", None),
    "priority-101": (body(priority=101), 400, "priority", None),
    "priority-high": (body(priority="high"), 400, "priority", None),
    "pool-with-spaces": (body(pool="Bad Pool!"), 400, "pool", None),
    "integrations": (body(integrations=[{"type": "wandb"}]), 400, "integrations", None),
    "unknown-field": (body(colour="blue"), 400, "colour", None),
    "model-missing": (
        lambda ctx: ctx.request("POST", JOBS, json={"training_file": ctx.file_id}),
        400,
        "model",
        None,
    ),
    "model-a-number": (body(model=7), 400, "model", None),
    "model-unknown": (body(model="no-such-model"), 400, "model", "model_not_found"),
    "model-unknown-fine-tune": (body(model="ft:tiny:x:y:ftjob-z"), 400, "model", "model_not_found"),
    "training_file-unknown": (body(training_file=NO_FILE), 400, "training_file", "file_not_found"),
    "training_file-another-teams": (another_teams_file, 400, "training_file", "file_not_found"),
    "training_file-deleted": (a_deleted_file, 400, "training_file", "file_not_found"),
    "validation_file-unknown": (body(validation_file=NO_FILE), 400, "validation_file", "file_not_found"),
    "suffix-dot-dot-slash": (body(suffix="../x"), 400, "suffix", None),
    "suffix-etc-passwd": (body(suffix="../etc/passwd"), 400, "suffix", None),
    "suffix-slash": (body(suffix="a/b"), 400, "suffix", None),
    "suffix-backslash": (body(suffix="a\\b"), 400, "suffix", None),
    "suffix-nul": (body(suffix="a\x00b"), 400, "suffix", None),
    "suffix-newline": (body(suffix="ab\n"), 400, "suffix", None),
    "suffix-dot-dot": (body(suffix=".."), 400, "suffix", None),
    "suffix-65-characters": (body(suffix="x" * 65), 400, "suffix", None),
    "metadata-17-keys": (body(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata", None),
    "metadata-513-character-value": (body(metadata={"k": "v" * 513}), 400, "metadata", None),
    "metadata-65-character-key": (body(metadata={"k" * 65: "v"}), 400, "metadata", None),
    "metadata-empty-key": (body(metadata={"": "v"}), 400, "metadata", None),
    "metadata-a-number-value": (body(metadata={"k": 1}), 400, "metadata.k", None),
    "metadata-a-list": (body(metadata=["k"]), 400, "metadata", None),
    "idempotency-key-256-characters": (
        lambda ctx: ctx.create({}, headers={"Idempotency-Key": "k" * 256}),
        400,
        "Idempotency-Key",
        None,
    ),
    # a cancel of a finished job (a cancelled one: test_jobs.py::test_cancel_queued_running_and_finished)
    "cancel-succeeded": (cancel_a_finished_job("succeeded"), 409, "fine_tuning_job_id", "job_finished"),
    "cancel-failed": (cancel_a_finished_job("failed"), 409, "fine_tuning_job_id", "job_finished"),
    # malformed JSON bodies
    "json-truncated": (raw(VALID_BODY[:-9], "application/json"), 400, None, "invalid_value"),
    "json-trailing-garbage": (raw(VALID_BODY + b" xyz", "application/json"), 400, None, "invalid_value"),
    "json-two-objects": (raw(VALID_BODY + VALID_BODY, "application/json"), 400, None, "invalid_value"),
    "json-an-array": (raw(b"[" + VALID_BODY + b"]", "application/json"), 400, None, "invalid_value"),
    "json-a-string": (raw(b'"model"', "application/json"), 400, None, "invalid_value"),
    "json-null": (raw(b"null", "application/json"), 400, None, "invalid_value"),
    "json-empty": (raw(b"", "application/json"), 400, None, "invalid_value"),
    "json-not-utf-8": (raw(b'{"model": "\xff"}', "application/json"), 400, None, "invalid_value"),
    "json-nested-100000-deep": (raw(NESTED, "application/json"), 400, None, "invalid_value"),
    # wrong content types
    "text-plain": (raw(VALID_BODY, "text/plain"), 415, None, "unsupported_media_type"),
    "form-encoded": (
        raw(b"model=m&training_file=f", "application/x-www-form-urlencoded"),
        415,
        None,
        "unsupported_media_type",
    ),
    "no-content-type": (raw(VALID_BODY, None), 415, None, "unsupported_media_type"),
    "json-to-the-upload-endpoint": (
        raw(b'{"file": "x", "purpose": "fine-tune"}', "application/json", "/v1/files"),
        415,
        "file",
        "unsupported_media_type",
    ),
    # bodies over TUNEPOOL_MAX_REQUEST_BODY_BYTES (1 MiB), refused before they are held whole
    "a-2-MiB-json-body": (
        raw(b'{"model": "' + b"m" * 2 * 1024**2 + b'"}', "application/json"),
        413,
        None,
        "request_too_large",
    ),
    "a-2-MiB-chunked-json-body": (
        lambda ctx: ctx.request(
            "POST",
            JOBS,
            content=iter([b'{"model": "', *[b"m" * 64 * 1024] * 32, b'"}']),  # no Content-Length
            headers={"Content-Type": "application/json"},
        ),
        413,
        None,
        "request_too_large",
    ),
    # huge headers (the limit: service/http_protocol.py)
    "a-64-KiB-header": (a_header_of(64 * 1024), 431, None, "request_header_fields_too_large"),
    "a-16-MiB-header": (a_header_of(16 * 1024**2), 431, None, "request_header_fields_too_large"),
    "5000-headers": (
        lambda ctx: ctx.request("GET", "/v1/files", headers=[(f"x-h{i}", "v") for i in range(5000)]),
        431,
        None,
        "request_header_fields_too_large",
    ),
}


@pytest.mark.parametrize(("send", "status", "param", "code"), CATALOGUE.values(), ids=CATALOGUE.keys())
def test_bad_request_is_refused_and_changes_nothing(
    stack: Stack, send: Send, status: int, param: str | None, code: str | None
) -> None:
    client = stack.team()
    ctx = Ctx(stack, client, new_file(client), ensure_model(stack))
    response = send(ctx)
    assert response.status_code == status, response.text[:1000]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["param"] == param, error
    assert code is None or error["code"] == code, error
    assert snapshot(stack, client) == ctx.before
    assert stack.client().get("/healthz").status_code == 200  # the API is still up


def test_a_request_just_under_the_header_limit_is_served(stack: Stack) -> None:
    """The limit refuses only the oversized: 16 KiB of headers (h11's own limit) still work, and
    the body after such a head is read as usual."""
    client = stack.team()
    padding = {"X-Padding": "a" * 16 * 1024}
    response = client.get("/v1/files", headers=padding)
    assert response.status_code == 200 and response.json()["data"] == []
    form = {"files": {"file": ("t.jsonl", chat_jsonl(3))}, "data": {"purpose": "fine-tune"}}
    uploaded = client.post("/v1/files", headers=padding, **form)
    assert uploaded.status_code == 200 and uploaded.json()["n_examples"] == 3, uploaded.text
