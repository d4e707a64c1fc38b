"""`tunepool files|jobs|models` as a user runs them: a subprocess against a running stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.conftest import System
from tests.service.conftest import ROOT, free_port
from tests.worker.training.conftest import chat_rows


def cli(
    system: System, key: str, home: Path, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),  # no config file of the machine's user
        "XDG_CONFIG_HOME": str(home / ".config"),
        "TUNEPOOL_API_URL": system.stack.url,
        "TUNEPOOL_API_KEY": key,
    }
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result))


def test_upload_train_follow_and_resume_a_download(system: System, tmp_path: Path) -> None:
    system.start_worker()
    client = system.team(name="acme")
    run = lambda *args: cli(system, client.key, tmp_path, *args)  # noqa: E731

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    uploaded = as_json(run("files", "upload", str(train), "--json"))
    assert uploaded["object"] == "file" and uploaded["n_examples"] == 16
    assert uploaded["id"] in ok(run("files", "list"))
    assert [f["id"] for f in as_json(run("files", "list", "--json"))] == [uploaded["id"]]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_rows(1)[0]) + "\nnot json\n{}\n")
    rejected = run("files", "upload", str(bad))
    assert rejected.returncode == 1 and rejected.stderr.startswith("error: ")
    assert "line 2" in rejected.stderr and "line 3" in rejected.stderr, rejected.stderr

    spec = tmp_path / "job.yaml"
    spec.write_text(
        "method:\n  type: supervised\n  supervised:\n"
        "    hyperparameters: {max_seq_length: 128, checkpoint_every: 1}\n"
    )
    job = as_json(
        run(
            "jobs", "create", "--from-yaml", str(spec), "--model", "tiny", "--training-file", uploaded["id"],
            "--loss", "dft", "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3",
            "--max-steps", "2", "--suffix", "cli", "--json",
        )
    )  # fmt: skip
    assert job["method"]["type"] == "dft" and job["user_provided_suffix"] == "cli"
    hp = job["method"]["dft"]["hyperparameters"]
    assert hp.get("max_steps") == 2 and hp.get("batch_size") == 4 and hp.get("max_seq_length") == 128, job[
        "method"
    ]

    followed = run("jobs", "follow", job["id"], "--interval", "0.3")
    out = ok(followed)
    assert "step 2/2" in out and "loss " in out and "tok/s" in out, out
    assert "started on worker" in out and f"job {job['id']} succeeded: ft:tiny:acme:cli:" in out, out

    listed = as_json(run("jobs", "list", "--status", "succeeded", "--json"))
    assert [j["id"] for j in listed] == [job["id"]]
    done = as_json(run("jobs", "get", job["id"], "--json"))
    assert done["status"] == "succeeded"
    assert done["id"] in ok(run("jobs", "get", job["id"])) and job["id"] in ok(run("jobs", "list"))
    models = [m["id"] for m in as_json(run("models", "list", "--json"))]
    assert "tiny" in models and done["fine_tuned_model"] in models
    assert "tiny" in ok(run("models", "list"))

    # The server's archive, whole; then a download cut in the middle, resumed by the CLI.
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    latest = max(checkpoints, key=lambda c: c["step_number"])
    assert latest["step_number"] == 2
    whole = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{latest['id']}/content").content
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    name = f"{job['id']}-step-2.tar"
    (downloads / f"{name}.part").write_bytes(whole[: len(whole) // 2])
    resumed = run("jobs", "download", job["id"], "--to", str(downloads), "--extract")
    ok(resumed)
    assert f"resuming {name}.part at byte {len(whole) // 2}" in resumed.stderr, resumed.stderr
    assert (downloads / name).read_bytes() == whole and not (downloads / f"{name}.part").exists()
    assert (downloads / name.removesuffix(".tar") / "config.json").is_file()
    # A .part that already holds everything (the rename was interrupted): the server's 416 says so.
    (downloads / name).rename(downloads / f"{name}.part")
    ok(run("jobs", "download", job["id"], "--to", str(downloads)))
    assert (downloads / name).read_bytes() == whole

    # An earlier checkpoint by its step, downloaded whole.
    if any(c["step_number"] == 1 for c in checkpoints):
        ok(run("jobs", "download", job["id"], "--checkpoint", "1", "--to", str(downloads)))
        assert (downloads / f"{job['id']}-step-1.tar").stat().st_size > 0
    missing = run("jobs", "download", job["id"], "--checkpoint", "99", "--to", str(downloads))
    assert missing.returncode == 1 and "no checkpoint at step 99" in missing.stderr


def test_follow_a_failed_job_and_errors(system: System, tmp_path: Path) -> None:
    system.start_worker()
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not JSON")
    system.stack.add_model("broken", str(broken))
    client = system.team()
    run = lambda *args: cli(system, client.key, tmp_path, *args)  # noqa: E731
    file_id = system.new_file(client, n=4)
    job = as_json(
        run("jobs", "create", "--model", "broken", "--training-file", file_id, "--max-steps", "2", "--json")
    )
    followed = run("jobs", "follow", job["id"], "--interval", "0.3")
    assert followed.returncode == 1, (followed.stdout, followed.stderr)
    assert f"error: job {job['id']} failed: invalid_model: " in followed.stderr, followed.stderr

    refused = run("jobs", "cancel", job["id"])
    assert refused.returncode == 1 and "cannot be cancelled" in refused.stderr, refused.stderr
    other = system.new_file(client, n=2)
    assert ok(run("files", "delete", other)) == f"deleted {other}\n"

    # API errors: one line on stderr, exit 1; usage errors exit 2; an unreachable server is named.
    missing = run("jobs", "get", "ftjob-doesnotexist")
    assert missing.returncode == 1 and missing.stderr.startswith("error: No such fine-tuning job")
    assert run("jobs", "create", "--training-file", file_id).returncode == 2
    port = free_port()
    env_url = {"TUNEPOOL_API_URL": f"http://127.0.0.1:{port}"}
    down = subprocess.run(
        [sys.executable, "-m", "service.cli", "models", "list"],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HOME": str(tmp_path),
            "TUNEPOOL_API_KEY": "x",
            **env_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and f"cannot reach http://127.0.0.1:{port}/v1/models" in down.stderr

    # The key and URL from the config file when the environment has none.
    config = tmp_path / ".config" / "tunepool" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'api_url = "{system.stack.url}/v1"\napi_key = "{client.key}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("TUNEPOOL_API_URL", "TUNEPOOL_API_KEY")}
    from_file = subprocess.run(
        [sys.executable, "-m", "service.cli", "jobs", "list", "--json"],
        cwd=ROOT,
        env={
            **env,
            "PYTHONPATH": str(ROOT),
            "HOME": str(tmp_path),
            "XDG_CONFIG_HOME": str(tmp_path / ".config"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [j["id"] for j in as_json(from_file)] == [job["id"]]
