"""A job's whole life through real processes: upload, create, a worker trains it, results through
the API, the downloaded checkpoint loads and generates, and a second job starts from it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from tests.e2e.conftest import System


def test_dft_job_end_to_end_then_fine_tune_the_fine_tuned_model(system: System, tmp_path: Path) -> None:
    system.start_worker()
    client = system.team(name="acme")
    file_id = system.new_file(client, n=16)
    job = system.submit(client, file_id, suffix="first", hyperparameters={"checkpoint_every": 2})
    done = system.wait(client, job["id"])
    assert done["status"] == "succeeded", (done, system.events(client, job["id"]), system.worker_logs())
    assert done["fine_tuned_model"] == f"ft:tiny:acme:first:{job['id']}"
    assert done["trained_tokens"] > 0 and done["progress"]["steps_completed"] == 4
    assert done["finished_at"] >= done["created_at"]

    metrics = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["data"]["loss"] > 0 for m in metrics)
    events = system.events(client, job["id"])
    assert any("started on worker" in e for e in events) and any("succeeded" in e for e in events)
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert checkpoints[0]["step_number"] == 4
    assert checkpoints[0]["metrics"]["train_loss"] > 0

    # The results file, as OpenAI attaches it.
    [results] = done["result_files"]
    csv_text = client.get(f"/v1/files/{results}/content").text
    assert csv_text.splitlines()[0].startswith("step,") and len(csv_text.splitlines()) == 5

    # The final checkpoint, downloaded, loads with transformers and generates.
    archive = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{checkpoints[0]['id']}/content")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path / "download", filter="data")
    [model_dir] = [p.parent for p in (tmp_path / "download").rglob("config.json")]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    ids: Any = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5)
    assert out.shape[-1] > ids.shape[-1]

    # The fine-tuned model is a model: listed, and a new job can start from it.
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert done["fine_tuned_model"] in models
    second = system.submit(client, file_id, model=done["fine_tuned_model"], hyperparameters={"max_steps": 1})
    second_done = system.wait(client, second["id"])
    assert second_done["status"] == "succeeded", system.events(client, second["id"])
    assert second_done["fine_tuned_model"].startswith("ft:tiny:acme::")
