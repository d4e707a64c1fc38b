"""Concurrent `Idempotency-Key` requests (issue 11, finding 4): identical ones get the same job,
different bodies get 409, never a 500; one job per key. Real HTTP on SQLite and PostgreSQL."""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from typing import Any

import httpx

from service.models import Job
from tests.service.conftest import Stack
from tests.service.helpers import ensure_model, new_file

N = 20


def race(stack: Stack, key: str, bodies: list[dict[str, Any]], idempotency_key: str) -> list[httpx.Response]:
    """Send every body at once, each on its own connection, all with the same Idempotency-Key."""
    start = threading.Barrier(len(bodies))
    answers: list[httpx.Response | None] = [None] * len(bodies)

    def send(i: int) -> None:
        with httpx.Client(base_url=stack.url, timeout=60) as http:
            start.wait()
            answers[i] = http.post(
                "/v1/fine_tuning/jobs",
                json=bodies[i],
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key},
            )

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(a is not None for a in answers)
    return [a for a in answers if a is not None]


def jobs_with_key(stack: Stack, team_id: str, idempotency_key: str) -> list[str]:
    with stack.db.session() as session:
        return list(
            session.scalars(
                Job.__table__.select()
                .with_only_columns(Job.id)
                .where(Job.team_id == team_id, Job.idempotency_key == idempotency_key)
            )
        )


def test_concurrent_identical_requests_get_the_same_job(stack: Stack) -> None:
    client = stack.team()
    body = {"model": ensure_model(stack), "training_file": new_file(client), "seed": 7}
    key = f"retry-{secrets.token_hex(4)}"
    answers = race(stack, client.key, [body] * N, key)
    failed = [a.text for a in answers if a.status_code != 200]
    assert Counter(a.status_code for a in answers) == {200: N}, failed
    assert len({a.json()["id"] for a in answers}) == 1
    assert jobs_with_key(stack, client.team_id, key) == [answers[0].json()["id"]]


def test_concurrent_different_bodies_get_one_job_and_409s(stack: Stack) -> None:
    client = stack.team()
    model, file_id = ensure_model(stack), new_file(client)
    key = f"pairs-{secrets.token_hex(4)}"
    bodies = [{"model": model, "training_file": file_id, "seed": i} for i in range(N)]
    answers = race(stack, client.key, bodies, key)
    codes = Counter(a.status_code for a in answers)
    assert codes == {200: 1, 409: N - 1}, [a.text for a in answers if a.status_code not in (200, 409)]
    for answer in answers:
        if answer.status_code == 409:
            error = answer.json()["error"]
            assert (error["param"], error["code"]) == ("Idempotency-Key", "idempotency_key_reused")
    made = jobs_with_key(stack, client.team_id, key)
    winner = next(a for a in answers if a.status_code == 200).json()
    assert made == [winner["id"]]
    # The winner is the body that made it: its own seed.
    assert winner["seed"] == bodies[[a.status_code for a in answers].index(200)]["seed"]
    # A retry of the winning body, later, still gets the same job.
    again = client.post(
        "/v1/fine_tuning/jobs",
        json=bodies[[a.status_code for a in answers].index(200)],
        headers={"Idempotency-Key": key},
    )
    assert again.status_code == 200 and again.json()["id"] == winner["id"]
