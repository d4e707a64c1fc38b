"""The official `openai` Python package, unchanged, against tunepool (DFT through `method`)."""

from __future__ import annotations

from pathlib import Path

import openai
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from service.models import Team
from tests.service.conftest import Stack, chat_jsonl
from tests.service.helpers import add_checkpoint, ensure_model


def test_the_openai_sdk_works_unchanged(stack: Stack, tmp_path: Path) -> None:
    team = stack.team()
    with stack.db.session() as session:
        session.get(Team, team.team_id).max_queued_jobs = 50  # type: ignore[union-attr]
        session.commit()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=team.key, max_retries=0)
    model = ensure_model(stack)

    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_jsonl(6))
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert isinstance(uploaded, FileObject) and uploaded.bytes == path.stat().st_size
    assert client.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert client.files.content(uploaded.id).read() == path.read_bytes()

    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=uploaded.id,
        method={"type": "dft", "dft": {"hyperparameters": {"n_epochs": 2}}},  # type: ignore[arg-type]
        suffix="sdk",
        metadata={"origin": "sdk-test"},
    )
    assert isinstance(job, FineTuningJob) and job.status == "queued" and job.method is not None
    assert job.method.type == "dft" and job.user_provided_suffix == "sdk"
    gpu_settings = {"precision": "bf16-mixed", "micro_batch_size": 2, "packing": True,
                    "gradient_checkpointing": True, "chat_template": "{{ messages[0].content }}"}  # fmt: skip
    sft = client.fine_tuning.jobs.create(
        model=model,
        training_file=uploaded.id,
        method={"type": "supervised", "supervised": {"hyperparameters": gpu_settings}},
    )
    assert sft.method is not None and sft.method.type == "supervised" and sft.method.supervised is not None
    assert sft.method.supervised.hyperparameters is not None  # tunepool's settings are the SDK's extras
    assert {k: getattr(sft.method.supervised.hyperparameters, k) for k in gpu_settings} == gpu_settings

    fetched = client.fine_tuning.jobs.retrieve(job.id)
    assert fetched.id == job.id and fetched.hyperparameters.n_epochs == 2

    for _ in range(5):
        client.fine_tuning.jobs.create(model=model, training_file=uploaded.id)
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # auto-pagination follows `after`
    assert len(listed) == 7 == len(set(listed)) and listed[-2:] == [sft.id, job.id]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1))
    assert len(events) >= 2 and all(isinstance(e, FineTuningJobEvent) for e in events)

    add_checkpoint(stack, job.id, 7, {"config.json": b"{}"})
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert len(checkpoints) == 1 and isinstance(checkpoints[0], FineTuningJobCheckpoint)
    assert checkpoints[0].step_number == 7 and checkpoints[0].metrics.train_loss == 0.5

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    try:
        client.fine_tuning.jobs.cancel(job.id)
        raise AssertionError("a second cancel must fail")
    except openai.ConflictError as err:
        assert err.status_code == 409 and err.code == "job_finished"
    try:
        client.fine_tuning.jobs.retrieve("ftjob-missing")
        raise AssertionError("a missing job must be a 404")
    except openai.NotFoundError as err:
        assert err.status_code == 404
    models = [m.id for m in client.models.list()]
    assert model in models
