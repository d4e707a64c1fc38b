"""A real worker process (`tunepool worker`) refuses messages that are not JSON: a pickled message on
its pool's queue, whose payload would create a marker file if it were ever unpickled, is rejected
without being executed, and the worker goes on to run a real job. No API key shows up in the
worker's or the API's log of that run. On Redis + PostgreSQL and on the embedded SQLite transport."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from celery import Celery
from kombu import Connection, Exchange, Queue

from service.dispatch import DISPATCH_TASK, queue_name
from tests.e2e.conftest import System

# What the worker logs for each of the two messages below.
TASK_REFUSED = "Received invalid task message: Refusing to deserialize untrusted content of type pickle"
BODY_REFUSED = "Can't decode message body: ContentDisallowed('Refusing to deserialize untrusted content"


class CreatesMarker:
    """Unpickling this calls open(path, "w"): the marker file exists if anything ever unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def send_pickled_messages(broker_url: str, marker: Path) -> None:
    """Two pickled messages to the default pool's queue: a Celery task message (protocol 2) as a
    client with `serializer="pickle"` would send it, and a bare kombu message (protocol 1 body)."""
    sender = Celery("attacker", broker=broker_url)
    sender.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    sender.send_task(DISPATCH_TASK, args=[CreatesMarker(marker)], queue=queue_name("default"))
    queue = Queue(queue_name("default"), Exchange(queue_name("default")), routing_key=queue_name("default"))
    body = {"task": DISPATCH_TASK, "id": str(uuid.uuid4()), "args": [CreatesMarker(marker)], "kwargs": {}}
    with Connection(broker_url) as conn:
        conn.Producer().publish(
            body, serializer="pickle", exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
        )


def full_worker_logs(system: System) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(system.home.glob("worker-*.log")))


def wait_for_log(system: System, text: str, count: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = full_worker_logs(system)
        if logs.count(text) >= count:
            return logs
        assert all(p.poll() is None for p in system.workers), f"the worker exited:\n{logs}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged {count} times within {timeout}s:\n{system.worker_logs()}")


def test_pickled_messages_are_refused_and_the_worker_keeps_working(system: System) -> None:
    marker = system.home / "UNPICKLED-MARKER"
    worker = system.start_worker()
    wait_for_log(system, "registered (pool default", 1)
    send_pickled_messages(system.stack.settings.broker_url, marker)
    # Celery names each refusal (kombu's ContentDisallowed) and discards the message.
    wait_for_log(system, TASK_REFUSED, 1)
    wait_for_log(system, BODY_REFUSED, 1)
    assert not marker.exists()
    assert worker.poll() is None

    client = system.team()
    job = system.submit(client, hyperparameters={"max_steps": 2})
    done = system.wait(client, job["id"])
    assert done["status"] == "succeeded", (done, system.events(client, job["id"]), system.worker_logs())
    assert not marker.exists()
    logs = full_worker_logs(system)
    assert logs.count(TASK_REFUSED) == logs.count(BODY_REFUSED) == 1  # discarded, not redelivered

    # The team's key went to the API with every request of this run; it reached no log.
    api_log = (system.home / "api.log").read_text(errors="replace")
    assert "Application startup complete" in api_log
    for text in (client.key, client.key[12:]):
        assert text not in api_log and text not in logs
