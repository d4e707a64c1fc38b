"""Property-based fuzzing of every API operation against the OpenAPI document (tests/service/api_fuzz.py).

Each run is bounded (FUZZ_EXAMPLES per operation and phase, a fixed seed, deterministic generation)
so CI sees the same requests every time; `python -m bench.fuzz_api` runs the same thing longer.

The fuzz gets a stack of its own, not the session's `stack`: its admin calls reach every team and
model they can list (quotas changed, models unregistered, keys added), which would leak into the
other tests sharing that stack.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import pytest

from service.models import Job
from tests.service.api_fuzz import FuzzTargets, fetch_document, run_fuzz, seed_targets
from tests.service.conftest import Stack, running_stack

# Per operation and phase: ~25 s of fuzzing a backend on the 2-core machine (the coverage phase,
# ~1400 boundary and invalid-value cases, does not depend on this number).
FUZZ_EXAMPLES = 100


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzz_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with running_stack(request.param, home, redis_db=13) as stack:
        yield stack


@pytest.fixture(scope="module")
def targets(fuzz_stack: Stack) -> FuzzTargets:
    return seed_targets(fuzz_stack)


def _labels(document: dict[str, object]) -> set[str]:
    paths = document["paths"]
    assert isinstance(paths, dict)
    return {f"{method.upper()} {path}" for path, item in paths.items() for method in item}


def test_every_operation_answers_as_documented(fuzz_stack: Stack, targets: FuzzTargets) -> None:
    report = run_fuzz(fuzz_stack.url, targets, max_examples=FUZZ_EXAMPLES)
    print(report.figures())
    assert not report.details, f"{len(report.details)} failures:\n" + "\n".join(report.details)
    document = fetch_document(fuzz_stack.url, targets)
    assert _labels(document) <= report.operations, "some operations were never fuzzed"
    assert report.cases["examples"] and report.cases["coverage"] and report.cases["fuzzing"]
    assert report.cases["stateful"], "no stateful chains: the document's links/ids were not followed"

    # The real ids reached past 404: the examples cancelled the queued job, deleted the spare file
    # and webhook, and (in the second pass, after everything else) revoked the spare key.
    with fuzz_stack.db.session() as session:
        assert session.query(Job).filter_by(id=targets.queued_job_id).one().status == "cancelled"
    team = httpx.Client(base_url=fuzz_stack.url, headers={"Authorization": f"Bearer {targets.team_key}"})
    with team:
        assert team.get(f"/v1/files/{targets.spare_file_id}").status_code == 404
        assert team.get(f"/v1/webhooks/{targets.spare_webhook_id}/deliveries").status_code == 404
        assert team.get("/v1/models").status_code == 200  # the team's key still works after the run
    admin = httpx.Client(base_url=fuzz_stack.url, headers={"Authorization": f"Bearer {targets.admin_key}"})
    with admin:
        keys = admin.get(f"/v1/admin/teams/{targets.admin_team}/keys").json()["data"]
        spare = next(k for k in keys if k["prefix"] == targets.spare_key_prefix)
        assert spare["revoked_at"] is not None


def test_the_fuzz_finds_an_undocumented_status(fuzz_stack: Stack, targets: FuzzTargets) -> None:
    """The harness is not vacuous: against a document that leaves out the 400 of GET
    /v1/fine_tuning/jobs, the same run reports it (the coverage phase sends limit=0 and limit=101)."""
    document = copy.deepcopy(fetch_document(fuzz_stack.url, targets))
    del document["paths"]["/v1/fine_tuning/jobs"]["get"]["responses"]["400"]
    report = run_fuzz(
        fuzz_stack.url, targets, max_examples=5, document=document, only_path="/v1/fine_tuning/jobs"
    )
    assert report.operations == {"GET /v1/fine_tuning/jobs", "POST /v1/fine_tuning/jobs"}
    assert report.failures["status_code_conformance"] >= 1, report.details  # one per phase that met it
    assert report.failures.keys() == {"status_code_conformance"}, report.details
    for line in report.details:
        assert line.startswith("GET /v1/fine_tuning/jobs [status_code_conformance]"), line
        assert "Received: 400" in line, line


def test_request_errors_are_documented_as_error_bodies(fuzz_stack: Stack) -> None:
    """Validation errors answer 400 (not FastAPI's 422), a JSON body of another Content-Type 415 and
    one over the body limit 413, each an ErrorBody: every operation that can get one says so."""
    document = httpx.get(f"{fuzz_stack.url}/openapi.json").json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method} {path}"
            if operation.get("parameters") or operation.get("requestBody"):
                assert responses["400"]["content"]["application/json"]["schema"] == error_body, path
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                for code in ("413", "415"):
                    assert responses[code]["content"]["application/json"]["schema"] == error_body, path
    # ... and real ones have that shape and status.
    team = fuzz_stack.team()
    too_large = {"url": "https://example.com/" + "x" * 2 * 1024**2}
    for response, status in (
        (team.get("/v1/fine_tuning/jobs", params={"limit": 0}), 400),
        (team.post("/v1/webhooks", content=b"url=x", headers={"Content-Type": "text/plain"}), 415),
        (team.post("/v1/webhooks", json=too_large), 413),
    ):
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
