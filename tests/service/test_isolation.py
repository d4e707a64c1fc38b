"""Teams are walled off: for every endpoint that takes an id, another team's id gets exactly the
404 that an id which does not exist gets (same status, same body once the id is swapped)."""

from __future__ import annotations

import json

import pytest

from tests.service.conftest import Stack
from tests.service.helpers import MODEL, add_checkpoint, add_metrics, new_file, new_job, set_job

ENDPOINTS = [
    ("GET", "/v1/files/{file}"),
    ("GET", "/v1/files/{file}/content"),
    ("DELETE", "/v1/files/{file}"),
    ("GET", "/v1/fine_tuning/jobs/{job}"),
    ("POST", "/v1/fine_tuning/jobs/{job}/cancel"),
    ("GET", "/v1/fine_tuning/jobs/{job}/events"),
    ("GET", "/v1/fine_tuning/jobs/{job}/events?stream=true"),
    ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints"),
    ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints/{ckpt}/content"),
    ("GET", "/v1/fine_tuning/jobs/{own_job}/checkpoints/{ckpt}/content"),
    ("GET", "/v1/fine_tuning/jobs/{job}/metrics"),
    ("GET", "/v1/models/{model}"),
]


@pytest.mark.parametrize(("method", "template"), ENDPOINTS)
def test_another_teams_id_is_indistinguishable_from_a_missing_one(
    stack: Stack, method: str, template: str
) -> None:
    a, b = stack.team(), stack.team()
    file_id = new_file(a)
    job = new_job(stack, a, file_id)
    ckpt = add_checkpoint(stack, job["id"], 3, {"config.json": b"{}"})
    add_metrics(stack, job["id"], 3)
    model = f"ft:{MODEL}:{a.name}:x:{job['id']}"
    set_job(stack, job["id"], status="succeeded", fine_tuned_model=model, finished_at=1)
    own_job = new_job(stack, b)["id"]
    real = {"file": file_id, "job": job["id"], "ckpt": ckpt, "model": model, "own_job": own_job}
    fake = {
        "file": "file-XXXXXXXXXXXXXXXXXXXXXXXX",
        "job": "ftjob-XXXXXXXXXXXXXXXXXXXXXXXX",
        "ckpt": "ftckpt-XXXXXXXXXXXXXXXXXXXXXXXX",
        "model": f"ft:{MODEL}:nobody:x:ftjob-X",
        "own_job": own_job,
    }

    theirs = b.request(method, template.format(**real))
    missing = b.request(method, template.format(**fake))
    assert theirs.status_code == missing.status_code == 404
    text_theirs = theirs.text
    for key in ("model", "ckpt", "file", "job"):  # the model name contains the job id: it goes first
        text_theirs = text_theirs.replace(real[key], fake[key])  # swap the ids, compare the rest
    assert json.loads(text_theirs) == missing.json()

    # nothing changed for the owner, who does reach the resource (so the 404 was about ownership)
    assert a.get(f"/v1/files/{file_id}").status_code == 200
    assert a.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "succeeded"
    owner = a.request(method, template.format(**{**real, "own_job": job["id"]}))
    assert owner.status_code != 404 and (owner.status_code < 400 or method == "POST")  # POST cancel: 409
