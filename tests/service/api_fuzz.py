"""Fuzz the running API against its own OpenAPI document with schemathesis (tests/service/test_fuzz.py
runs it bounded; bench/fuzz_api.py runs it long).

schemathesis' engine (what `schemathesis run` drives) loads `{url}/openapi.json` and runs its
phases: the document's examples, coverage (boundary and invalid values of every parameter), random
fuzzing, and stateful chains (ids one response gives fed to the next request). Each response is
checked against the document: no 5xx, a documented status, content type, body and headers.

So that id-taking operations get past 404, `seed_targets` makes real objects (files, a finished
job with a checkpoint, metrics and a webhook delivery, a queued job, webhooks, a team and a model
for the admin calls), and `with_examples` writes their ids into the document as the parameters'
examples (and valid bodies for job creation and upload, which random data almost never is).
`max_examples` bounds each operation in each phase. Keys: the fuzzed team's for everything, an
admin team's for /v1/admin. Revoking a key is fuzzed last, on its
own: values from earlier responses (key prefixes from listings) would otherwise let it revoke the
keys the rest of the run authenticates with.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import schemathesis
from schemathesis import BaseSchema
from schemathesis.engine import events, from_schema

from service.models import Job, JobStatus
from service.teams import prefix_of
from service.webhooks import enqueue_job_event
from tests.service.conftest import Stack, TeamClient, chat_jsonl
from tests.service.helpers import MODEL, add_checkpoint, add_metrics, new_file, new_job, set_job

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
REVOKE_PATH = "/v1/admin/keys/{prefix}/revoke"
SEED = 20240611


@dataclass(frozen=True)
class FuzzTargets:
    """Real objects the fuzzed requests can name, and the keys they authenticate with."""

    team_key: str
    admin_key: str
    file_id: str  # the training file of both jobs: deleting it answers 409 while the queued job lives
    spare_file_id: str  # in no job: DELETE /v1/files/{id} may remove it
    job_id: str  # succeeded, with a checkpoint, metrics, events and a fine-tuned model
    queued_job_id: str  # for cancel
    checkpoint_id: str
    fine_tuned_model: str
    webhook_id: str
    spare_webhook_id: str  # DELETE /v1/webhooks/{id} may remove it
    admin_team: str  # a team the admin calls read and change (quotas, keys)
    spare_key_prefix: str  # a key of that team, for the revoke pass
    spare_model: str  # a registered model DELETE /v1/admin/models/{name} may remove


def _webhook(team: TeamClient) -> str:
    response = team.post("/v1/webhooks", json={"url": "https://example.com/hook"})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def seed_targets(stack: Stack) -> FuzzTargets:
    team = stack.team(name="fuzz-team")
    admin = stack.team(admin=True, name="fuzz-admin")
    victim = stack.team(name="fuzz-victim")
    stack.add_model("fuzz-spare-model", stack.model_dir("spare"))
    file_id = new_file(team)
    job = new_job(stack, team, file_id, suffix="fuzz")
    queued = new_job(stack, team, file_id)
    webhook_id, spare_webhook_id = _webhook(team), _webhook(team)
    fine_tuned = f"ft:{MODEL}:fuzz-team:fuzz:{job['id']}"
    set_job(stack, job["id"], status="succeeded", fine_tuned_model=fine_tuned, finished_at=int(time.time()))
    with stack.db.session() as session:  # what the worker that finished the job would have queued
        enqueue_job_event(session, session.query(Job).filter_by(id=job["id"]).one(), JobStatus.SUCCEEDED)
        session.commit()
    checkpoint_files = {"config.json": b"{}", "model.safetensors": b"x" * 4096}
    checkpoint_id = add_checkpoint(stack, job["id"], 2, checkpoint_files)
    add_metrics(stack, job["id"], 3)
    return FuzzTargets(
        team_key=team.key,
        admin_key=admin.key,
        file_id=file_id,
        spare_file_id=new_file(team),
        job_id=job["id"],
        queued_job_id=queued["id"],
        checkpoint_id=checkpoint_id,
        fine_tuned_model=fine_tuned,
        webhook_id=webhook_id,
        spare_webhook_id=spare_webhook_id,
        admin_team=victim.name,
        spare_key_prefix=prefix_of(victim.key),
        spare_model="fuzz-spare-model",
    )


def _path_examples(path: str, method: str, t: FuzzTargets) -> dict[str, str]:
    """Real values for the path parameters of one operation."""
    return {
        "fine_tuning_job_id": t.queued_job_id if path.endswith("/cancel") else t.job_id,
        "checkpoint_id": t.checkpoint_id,
        "file_id": t.spare_file_id if method == "delete" else t.file_id,
        "webhook_id": t.spare_webhook_id if method == "delete" else t.webhook_id,
        "model_id": t.fine_tuned_model,
        "prefix": t.spare_key_prefix,
        "name": t.spare_model if path.startswith("/v1/admin/models") else t.admin_team,
    }


# A whole archive, a resumed download, its last bytes, and one past the end (416).
RANGE_EXAMPLES = ["bytes=0-99", "bytes=512-", "bytes=-10", "bytes=99999999-"]


def with_examples(document: dict[str, Any], targets: FuzzTargets) -> dict[str, Any]:
    """The document with real ids as the examples of its path parameters, and valid bodies as the
    examples of job creation and upload (random data is almost never a valid job or JSONL file)."""
    doc = copy.deepcopy(document)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            examples = _path_examples(path, method, targets)
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in examples:
                    parameter["schema"]["examples"] = [examples[parameter["name"]]]
                elif parameter["in"] == "header" and parameter["name"] == "Range":
                    parameter["schema"]["examples"] = RANGE_EXAMPLES
    paths = doc["paths"]
    job_body = paths["/v1/fine_tuning/jobs"]["post"]["requestBody"]["content"]["application/json"]
    job_body["example"] = {"model": MODEL, "training_file": targets.file_id, "method": {"type": "dft"}}
    upload = paths["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]
    upload["example"] = {"file": chat_jsonl(2).decode(), "purpose": "fine-tune"}
    return doc


@dataclass
class FuzzReport:
    """What one run tried and found."""

    operations: set[str] = field(default_factory=set)
    cases: Counter[str] = field(default_factory=Counter)  # requests sent, by phase
    failures: Counter[str] = field(default_factory=Counter)  # distinct failures, by check
    details: list[str] = field(default_factory=list)  # one line per failure or engine error
    errors: int = 0
    seconds: float = 0.0

    def add(self, other: FuzzReport) -> None:
        self.operations |= other.operations
        self.cases.update(other.cases)
        self.failures.update(other.failures)
        self.details += other.details
        self.errors += other.errors
        self.seconds += other.seconds

    def figures(self) -> dict[str, Any]:
        return {
            "operations": len(self.operations - {"Stateful tests"}),
            "examples": sum(self.cases.values()),
            "examples_by_phase": dict(self.cases),
            "failures": sum(self.failures.values()),
            "failures_by_check": dict(self.failures),
            "errors": self.errors,
            "seconds": round(self.seconds, 1),
        }


def _config(
    url: str, targets: FuzzTargets, max_examples: int, seed: int, *, stateful: bool
) -> schemathesis.Config:
    operations: list[dict[str, Any]] = [
        {"include-path-regex": "^/v1/admin/", "headers": {"Authorization": f"Bearer {targets.admin_key}"}},
        # A live event stream of a running job never ends: it is read for this long, then cut.
        {"include-path-regex": "/events$", "request-timeout": 2},
    ]
    return schemathesis.Config.from_dict(
        {
            "seed": seed,
            "base-url": url,
            "headers": {"Authorization": f"Bearer {targets.team_key}"},
            "workers": 1,  # one request at a time, in one order: reproducible for one seed
            "request-timeout": 30,
            "generation": {"max-examples": max_examples, "deterministic": True, "database": "none"},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            # Links between operations come from the document's schemas (dependency analysis): the
            # API sends no Location headers, and schemathesis 4.32's URL harvesting from response
            # bodies raises on a malformed URL a response echoes (a webhook's `https://[...`).
            "phases": {
                "stateful": {"enabled": stateful, "inference": {"algorithms": ["dependency-analysis"]}}
            },
            "operations": operations,
        }
    )


def _run_once(schema: BaseSchema) -> FuzzReport:
    report = FuzzReport()
    started = time.perf_counter()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            report.operations.add(recorder.label)
            report.cases[event.phase.value] += len(recorder.cases)
            for checks in recorder.checks.values():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    report.failures[check.name] += 1
                    failure = check.failure_info.failure
                    request = check.failure_info.code_sample.replace("\n", " ")
                    report.details.append(
                        f"{recorder.label} [{check.name}] {failure.title}: {failure.message} -- {request}"
                    )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            report.errors += 1
            error = event.info if isinstance(event, events.NonFatalError) else event.exception
            report.details.append(f"engine error: {error}")
    report.seconds = time.perf_counter() - started
    return report


def fetch_document(url: str, targets: FuzzTargets) -> dict[str, Any]:
    """The API's OpenAPI document, with the targets' ids as examples."""
    return with_examples(httpx.get(f"{url}/openapi.json", timeout=30).raise_for_status().json(), targets)


def run_fuzz(
    url: str,
    targets: FuzzTargets,
    *,
    max_examples: int,
    seed: int = SEED,
    document: dict[str, Any] | None = None,
    only_path: str | None = None,
) -> FuzzReport:
    """Every operation of the API at `url` (or those of `only_path`), checked against `document`
    (default: the API's own, with the targets' ids); key revocation in a second pass after the rest."""
    document = document or fetch_document(url, targets)

    def schema(*, stateful: bool) -> BaseSchema:
        config = _config(url, targets, max_examples, seed, stateful=stateful)
        return schemathesis.openapi.from_dict(document, config=config)

    # One path alone has no links between operations to follow: no stateful phase.
    if only_path is not None:
        return _run_once(_only(schema(stateful=False), only_path))
    report = _run_once(schema(stateful=True).exclude(path=REVOKE_PATH))
    report.add(_run_once(_only(schema(stateful=False), REVOKE_PATH)))
    return report


def _only(schema: BaseSchema, path: str) -> BaseSchema:
    # Not `schema.include(path=...)`: with per-operation settings in the config, the schema already
    # includes every operation, and includes add up (any one matching is enough).
    return schema.exclude(lambda ctx: ctx.operation.path != path)
