"""`tunepool jobs create|list|get|cancel|pause|resume|why`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from service.usercli.common import (
    FROM_YAML_OPTION,
    JSON_OPTION,
    LOSSES,
    Api,
    _console,
    _pages,
    fail,
    jobs_app,
    kv_table,
    print_json,
    when,
)

CHAT_TEMPLATE_OPTION = typer.Option(
    None, help="a Jinja file replacing the model's chat template", metavar="FILE"
)


def job_body(
    from_yaml: Path | None,
    model: str | None,
    training_file: str | None,
    validation_file: str | None,
    loss: str | None,
    hyperparameters: dict[str, Any],
    fields: dict[str, Any],
) -> dict[str, Any]:
    """The REST body: the YAML file's fields (the same as the body's), with the options on top."""
    body: dict[str, Any] = {}
    if from_yaml is not None:
        import yaml

        try:
            loaded = yaml.safe_load(from_yaml.read_text())
        except (OSError, yaml.YAMLError) as err:
            fail(f"--from-yaml: cannot read {from_yaml}: {err}", 2)
        if not isinstance(loaded, dict):
            fail(f"--from-yaml: {from_yaml} must hold a mapping of job fields", 2)
        body = loaded
    for key, value in {
        "model": model,
        "training_file": training_file,
        "validation_file": validation_file,
        **fields,
    }.items():
        if value is not None:
            body[key] = value
    method = body.get("method") or {}
    if not isinstance(method, dict):
        fail("method: must be a mapping like {type: dft}", 2)
    old_type = method.get("type") or "dft"
    new_type = LOSSES[loss] if loss else old_type
    hp = dict(((method.get(old_type) or {}).get("hyperparameters")) or {})
    for key, value in hyperparameters.items():
        if isinstance(value, dict) and isinstance(hp.get(key), dict):
            hp[key] = {**hp[key], **value}  # --lora-quantize keeps the YAML's other lora settings
        elif value is not None:
            hp[key] = value
    body["method"] = {"type": new_type, **({new_type: {"hyperparameters": hp}} if hp else {})}
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "training_file") if not body.get(k)]
    if missing:
        fail(f"give {' and '.join(missing)} (or put them in --from-yaml)", 2)
    return body


@jobs_app.command("create")
def jobs_create(
    model: str | None = typer.Option(None, help="a base model or one of your fine-tuned models"),
    training_file: str | None = typer.Option(None, help="the training file's id (file-...)"),
    validation_file: str | None = typer.Option(None, help="the validation file's id"),
    loss: str | None = typer.Option(None, help="dft (default) or sft"),
    epochs: int | None = typer.Option(None, help="n_epochs"),
    batch_size: int | None = typer.Option(None, help="sequences per optimizer step"),
    learning_rate: float | None = typer.Option(None, help="peak learning rate"),
    max_steps: int | None = typer.Option(None, help="stop after this many optimizer steps"),
    precision: str | None = typer.Option(None, help="auto, fp32, bf16-mixed or bf16-pure"),
    micro_batch_size: int | None = typer.Option(None, help="sequences per forward pass per device"),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing", help="recompute activations"
    ),
    packing: bool | None = typer.Option(None, "--packing/--no-packing", help="padding-free batches"),
    chat_template: Path | None = CHAT_TEMPLATE_OPTION,
    lora_quantize: str | None = typer.Option(None, help="nf4: QLoRA (a LoRA job on a 4-bit base; GPU)"),
    suffix: str | None = typer.Option(None, help="added to the fine-tuned model's name"),
    pool: str | None = typer.Option(None, help="the GPU pool to run on"),
    priority: int | None = typer.Option(None, help="-100..100, higher first within your team"),
    gpus: int | None = typer.Option(None, help="GPUs of one node to train on (default 1)"),
    preemptible: bool | None = typer.Option(
        None, "--preemptible/--not-preemptible", help="--not-preemptible: exempt it (if your team may)"
    ),
    from_yaml: Path | None = FROM_YAML_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a fine-tuning job (DFT unless --loss sft or the YAML says otherwise)."""
    if loss is not None and loss not in LOSSES:
        fail(f"--loss: {loss!r} is not one of dft, sft", 2)
    template = None
    if chat_template is not None:
        try:
            template = chat_template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            fail(f"--chat-template: cannot read {chat_template}: {err}", 2)
    body = job_body(
        from_yaml,
        model,
        training_file,
        validation_file,
        loss,
        {
            "n_epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "max_steps": max_steps,
            "precision": precision,
            "micro_batch_size": micro_batch_size,
            "gradient_checkpointing": gradient_checkpointing,
            "packing": packing,
            "chat_template": template,
            "lora": {"quantize": lora_quantize} if lora_quantize is not None else None,
        },
        {"suffix": suffix, "pool": pool, "priority": priority, "gpus": gpus, "preemptible": preemptible},
    )
    job = Api().request("POST", "/v1/fine_tuning/jobs", json=body)
    if as_json:
        return print_json(job)
    typer.echo(f"created job {job['id']} ({job['method']['type']} on {job['model']}, {job['status']})")
    typer.echo(f"follow it with: tunepool jobs follow {job['id']}")


@jobs_app.command("list")
def jobs_list(
    status: str | None = typer.Option(None, help="only jobs in this status (queued, running, ...)"),
    limit: int = typer.Option(20, help="at most this many jobs"),
    as_json: bool = JSON_OPTION,
) -> None:
    """List your team's jobs, newest first."""
    jobs = _pages(Api(), "/v1/fine_tuning/jobs", limit, status=status)
    if as_json:
        return print_json(jobs)
    table = Table(
        "id", "model", "method", "status", "steps", "created (UTC)", "fine-tuned model", title="jobs"
    )
    for j in jobs:
        p = j["progress"]
        steps = f"{p['steps_completed']}/{p['total_steps'] if p['total_steps'] is not None else '?'}"
        method = j["method"]["type"]
        table.add_row(
            j["id"],
            j["model"],
            method,
            j["status"],
            steps,
            when(j["created_at"]),
            j["fine_tuned_model"] or "-",
        )
    _console().print(table)


@jobs_app.command("get")
def jobs_get(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """Show one job."""
    job = Api().get(f"/v1/fine_tuning/jobs/{job_id}")
    if as_json:
        return print_json(job)
    error = job.get("error")
    kv_table(
        job["id"],
        {
            "status": job["status"],
            "model": job["model"],
            "method": job["method"]["type"],
            "fine_tuned_model": job["fine_tuned_model"],
            "training_file": job["training_file"],
            "validation_file": job["validation_file"],
            "hyperparameters": job["hyperparameters"],
            "progress": job["progress"],
            "queue_position": job.get("queue_position"),
            "queue_reason": job.get("queue_reason"),
            "preemptions": str(job.get("preemptions", 0)),
            "pool": job["pool"],
            "priority": str(job["priority"]),
            "gpus": str(job.get("gpus", 1)),
            "attempt": str(job["attempt"]),
            "trained_tokens": job["trained_tokens"],
            "created_at": when(job["created_at"]),
            "finished_at": when(job["finished_at"]) if job["finished_at"] else None,
            "error": f"{error['code']}: {error['message']}" if error else None,
            "result_files": ", ".join(job["result_files"]) or None,
        },
    )


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """Cancel a job (a running one stops after its current step)."""
    job = Api().request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")
    if as_json:
        return print_json(job)
    typer.echo(f"cancel requested: job {job['id']} is {job['status']}")


@jobs_app.command("pause")
def jobs_pause(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """Pause a job: a running one checkpoints its current step and frees its GPUs; a queued one is held."""
    job = Api().request("POST", f"/v1/fine_tuning/jobs/{job_id}/pause")
    if as_json:
        return print_json(job)
    if job.get("pause_requested"):
        typer.echo(f"pause requested: job {job['id']} checkpoints its current step, then is paused")
    else:
        typer.echo(f"job {job['id']} is {job['status']}")


@jobs_app.command("resume")
def jobs_resume(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """Resume a paused job: back in the queue, it continues from its checkpoint."""
    job = Api().request("POST", f"/v1/fine_tuning/jobs/{job_id}/resume")
    if as_json:
        return print_json(job)
    typer.echo(f"job {job['id']} is {job['status']}")


@jobs_app.command("why")
def jobs_why(job_id: str, as_json: bool = JSON_OPTION) -> None:
    """Why a job waits: its place in the queue and the scheduler's reason."""
    job = Api().get(f"/v1/fine_tuning/jobs/{job_id}")
    answer = {
        "id": job["id"],
        "status": job["status"],
        "queue_position": job.get("queue_position"),
        "queue_reason": job.get("queue_reason"),
    }
    if as_json:
        return print_json(answer)
    if job["status"] != "queued":
        detail = " (pause requested)" if job.get("pause_requested") else ""
        typer.echo(f"job {job['id']} is {job['status']}{detail}: it is not waiting")
        return
    reason = job.get("queue_reason") or "not yet looked at by the scheduler (it looks every few seconds)"
    where = f"position {job.get('queue_position')} in pool {job['pool']}"
    typer.echo(f"job {job['id']} is queued, {where}: {reason}")
