"""Webhooks end to end: a loopback receiver gets one signed delivery per terminal event, from a real
worker's delivery thread; retries after 5xx; concurrent delivery loops never double-send; a receiver
that drips its answer delays neither the worker's heartbeats nor another team's deliveries; and a
team sees only its own endpoints. (The stack allows loopback targets: TUNEPOOL_WEBHOOK_ALLOW_CIDRS.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
from sqlalchemy import update

from service.jobs import set_status
from service.models import Job, JobStatus, Team, Worker
from service.webhook_sender import POLL_S, deliver_due
from tests.e2e.conftest import System
from tests.service.conftest import TeamClient


@dataclass
class Receiver:
    url: str
    codes: list[int]  # answers in order; 200 once they run out
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body in self.received]

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= n:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{len(self.received)} requests received, expected {n}")


@contextmanager
def receiver(codes: list[int] | None = None) -> Iterator[Receiver]:
    state = Receiver("", list(codes or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            with state.lock:
                state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = state.codes.pop(0) if state.codes else 200
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Drip:
    url: str
    connections: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


@contextmanager
def dripping() -> Iterator[Drip]:
    """A receiver that reads the request, then sends its status line and one header line a second,
    for ever: every read succeeds within a per-read timeout, so only a deadline ends the send."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    state = Drip(f"http://127.0.0.1:{server.getsockname()[1]}/drip")

    def drip(conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                n = 0
                while not state.stop.wait(1.0):
                    n += 1
                    conn.sendall(f"x-drip-{n}: still here\r\n".encode())
            except OSError:
                return  # the sender gave up and closed

    def serve() -> None:
        while not state.stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            state.connections += 1
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        thread.join(5)
        server.close()


def register(client: TeamClient, url: str, events: list[str] | None = None) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": url, **({"events": events} if events else {})})
    assert response.status_code == 200, response.text
    endpoint = dict(response.json())
    assert endpoint["secret"].startswith("whsec_")
    return endpoint


def verify(headers: dict[str, str], body: bytes, secret: str) -> None:
    """The Standard Webhooks check, by hand and with the openai package's own verifier."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}".encode()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9").webhooks.verify_signature(
        body, headers, secret=secret
    )


def deliveries(client: TeamClient, endpoint_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/webhooks/{endpoint_id}/deliveries")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def test_worker_delivers_one_signed_event_per_finished_job(system: System) -> None:
    client = system.team()
    with receiver() as hook, receiver() as failed_only:
        endpoint = register(client, hook.url)
        filtered = register(client, failed_only.url, events=["fine_tuning.job.failed"])
        system.start_worker()
        job = system.submit(client)
        assert system.wait(client, job["id"])["status"] == "succeeded", system.worker_logs()
        hook.wait_for(1)
        time.sleep(2.5)  # more maintenance rounds: nothing is sent twice
        assert len(hook.received) == 1 and failed_only.received == []

        headers, body = hook.received[0]
        verify(headers, body, endpoint["secret"])
        event = json.loads(body)
        assert event["object"] == "event" and event["type"] == "fine_tuning.job.succeeded"
        assert event["data"] == {"id": job["id"]} and event["id"].startswith("evt_")
        assert headers["webhook-id"] == event["id"]

        [delivery] = deliveries(client, endpoint["id"])
        assert delivery["status"] == "delivered" and delivery["attempts"] == 1
        assert delivery["last_response_code"] == 200 and delivery["next_attempt_at"] is None
        assert delivery["job_id"] == job["id"] and delivery["event_type"] == "fine_tuning.job.succeeded"
        assert deliveries(client, filtered["id"]) == []


def test_retried_after_5xx_until_accepted(system: System) -> None:
    client = system.team()
    with receiver(codes=[500, 500]) as hook:
        endpoint = register(client, hook.url)
        job = system.submit(client)  # no worker yet: it stays queued
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        [pending] = deliveries(client, endpoint["id"])  # written with the cancel, before any worker
        assert pending["status"] == "pending" and pending["attempts"] == 0
        system.start_worker()  # its maintenance thread delivers
        hook.wait_for(3)
        deadline = time.monotonic() + 30
        while (delivery := deliveries(client, endpoint["id"])[0])["status"] == "pending":
            assert time.monotonic() < deadline, delivery
            time.sleep(0.2)
        assert delivery["status"] == "delivered" and delivery["attempts"] == 3
        assert delivery["last_response_code"] == 200
        bodies = hook.bodies()
        assert len(bodies) == 3 and all(b == bodies[0] for b in bodies)  # the same event every time
        assert bodies[0]["type"] == "fine_tuning.job.cancelled"
        for headers, body in hook.received:
            verify(headers, body, endpoint["secret"])


def test_concurrent_loops_send_each_attempt_once_and_give_up(system: System) -> None:
    """Direct transitions and `deliver_due` from several threads at once (no worker)."""
    settings, db = system.stack.settings, system.stack.db
    client = system.team()
    with receiver() as hook, receiver(codes=[503] * 100) as down:
        register(client, hook.url)
        broken = register(client, down.url)
        jobs = [system.submit(client)["id"] for _ in range(3)]
        with db.session() as session:
            for job_id, status in zip(
                jobs, [JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.CANCELLED], strict=True
            ):
                set_status(session, session.query(Job).filter_by(id=job_id).one(), status)
            session.commit()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: deliver_due(db, settings), range(4)))
            states = {d["status"] for d in deliveries(client, broken["id"])}
            if states == {"failed"}:
                break
            time.sleep(0.1)
        assert sorted(b["data"]["id"] for b in hook.bodies()) == sorted(jobs)  # once each
        attempts = settings.webhook_max_attempts
        assert len(down.received) == 3 * attempts
        for delivery in deliveries(client, broken["id"]):
            assert delivery["status"] == "failed" and delivery["attempts"] == attempts
            assert delivery["last_response_code"] == 503 and delivery["last_error"] == "HTTP 503"


def test_endpoints_belong_to_their_team(system: System) -> None:
    alice, bob = system.team(), system.team()
    endpoint = register(alice, "https://example.invalid/hook")
    listed = alice.get("/v1/webhooks").json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and listed[0]["secret"] is None  # shown once
    assert bob.get("/v1/webhooks").json()["data"] == []
    for response in (
        bob.get(f"/v1/webhooks/{endpoint['id']}/deliveries"),
        bob.delete(f"/v1/webhooks/{endpoint['id']}"),
        alice.get("/v1/webhooks/wh_doesnotexist/deliveries"),
    ):
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    bad = alice.post("/v1/webhooks", json={"url": "ftp://x/y", "events": ["fine_tuning.job.succeeded"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
    bad = alice.post("/v1/webhooks", json={"url": "https://x.example/y", "events": ["nope"]})
    assert bad.status_code == 400
    assert alice.delete(f"/v1/webhooks/{endpoint['id']}").json() == {
        "object": "webhook_endpoint.deleted",
        "id": endpoint["id"],
        "deleted": True,
    }
    assert alice.get("/v1/webhooks").json()["data"] == []


def test_a_dripping_receiver_delays_no_heartbeat_and_no_other_team(system: System) -> None:
    """Team A's receiver drips its answer; A has a dozen deliveries due, more than its share of the
    worker's send slots. The worker's heartbeat stays fresh (read from the registry at every
    heartbeat interval) and team B's delivery arrives within one heartbeat of an undisturbed one."""
    settings = system.stack.settings
    alice, bob = system.team(), system.team()
    with dripping() as drip, receiver() as hook:
        slow = register(alice, drip.url)
        register(bob, hook.url)
        file_id = system.new_file(alice)
        for _ in range(settings.webhook_team_concurrency + 4):  # cancelled while queued: one delivery each
            job = system.submit(alice, file_id)
            assert alice.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
        bob_job = system.submit(bob)
        with system.stack.db.session() as session:  # B's job stays queued: its cancel is immediate
            session.execute(update(Team).where(Team.id == bob.team_id).values(max_running_jobs=0))
            session.commit()
        system.start_worker()
        deadline = time.monotonic() + 60
        while drip.connections < settings.webhook_team_concurrency:  # A's sends are under way
            assert time.monotonic() < deadline, system.worker_logs()
            time.sleep(0.1)

        staleness = []
        cancelled_at = received_after = None
        observe_until = time.monotonic() + 4 * settings.webhook_timeout_s  # several of A's deadlines
        while time.monotonic() < observe_until:
            with system.stack.db.session() as session:
                beats = session.query(Worker.last_heartbeat_at).all()
            assert len(beats) == 1, beats
            staleness.append(time.time() - beats[0][0])
            if cancelled_at is None and time.monotonic() > observe_until - 2 * settings.webhook_timeout_s:
                assert bob.post(f"/v1/fine_tuning/jobs/{bob_job['id']}/cancel").status_code == 200
                cancelled_at = time.monotonic()
            if cancelled_at is not None and received_after is None and hook.received:
                received_after = time.monotonic() - cancelled_at
            time.sleep(settings.heartbeat_s / 4)

        heartbeat = settings.heartbeat_s
        # A beat is due every heartbeat_s: a reading older than two means one was delayed by more than one.
        assert max(staleness) < 2 * heartbeat + 0.5, (max(staleness), system.worker_logs())
        # Undisturbed, a delivery waits at most one poll of the loop (POLL_S) before it is sent.
        assert received_after is not None and received_after < POLL_S + heartbeat + 0.5, received_after
        assert hook.bodies()[0]["data"] == {"id": bob_job["id"]}
        assert drip.connections > settings.webhook_team_concurrency  # cut at the deadline, then retried
        timed_out = [d for d in deliveries(alice, slow["id"]) if d["attempts"] >= 1 and d["last_error"]]
        assert timed_out and all(d["last_error"].startswith("timeout: ") for d in timed_out), timed_out
