"""Helpers of the webhook tests that deliver in the test's own process: a real HTTP receiver that
counts every TCP connection it accepts (so a test can tell that nothing reached an address at all),
endpoints and deliveries written straight into the stack's database (as rows stored before a
check existed would be), and delivery rounds run until a given row was tried."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from service.models import WebhookDelivery, WebhookEndpoint, new_id
from service.netguard import Resolver, system_resolver
from service.secretbox import secret_box
from service.settings import Settings
from service.webhook_sender import deliver_due
from service.webhooks import new_secret
from tests.service.conftest import Stack, TeamClient


@dataclass
class Listener:
    host: str
    port: int = 0
    connections: int = 0  # TCP connections accepted, whatever they sent
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, host: str | None = None, path: str = "/hook") -> str:
        return f"http://{host or self.host}:{self.port}{path}"


@contextmanager
def listening(host: str = "127.0.0.1", port: int = 0) -> Iterator[Listener]:
    state = Listener(host)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with state.lock:
                state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def verify_request(self, request: Any, client_address: Any) -> bool:
            with state.lock:
                state.connections += 1
            return True

    server = Server((host, port), Handler)
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def stored_endpoint(stack: Stack, team: TeamClient, url: str, *, plaintext: bool = False) -> tuple[str, str]:
    """An endpoint row for `url`, unchecked (encrypted secret, or a plaintext one as rows written
    before encryption hold): (endpoint id, secret)."""
    secret = new_secret()
    stored = secret if plaintext else secret_box(stack.settings).seal(secret)
    with stack.db.session() as session:
        endpoint = WebhookEndpoint(team_id=team.team_id, url=url, events=None, secret=stored)
        session.add(endpoint)
        session.commit()
        return endpoint.id, secret


def pending_delivery(stack: Stack, endpoint_id: str) -> str:
    """A delivery of a made-up `succeeded` event, due now; its id."""
    event_id = new_id("evt_")
    with stack.db.session() as session:
        delivery = WebhookDelivery(
            endpoint_id=endpoint_id, event_id=event_id, event_type="fine_tuning.job.succeeded",
            job_id="ftjob-test", payload=f'{{"id":"{event_id}","object":"event"}}', status="pending",
            attempts=0, next_attempt_at=time.time(),
        )  # fmt: skip
        session.add(delivery)
        session.commit()
        return delivery.id


def delivery_row(stack: Stack, delivery_id: str) -> WebhookDelivery:
    with stack.db.session() as session:
        row = session.query(WebhookDelivery).filter_by(id=delivery_id).one()
        session.expunge(row)
        return row


def deliver_until_tried(
    stack: Stack, settings: Settings, delivery_id: str, resolver: Resolver = system_resolver
) -> WebhookDelivery:
    """Delivery rounds (the stack is shared: other tests' rows may be due too) until this row has had
    an attempt; the row then."""
    deadline = time.monotonic() + 30
    while (row := delivery_row(stack, delivery_id)).attempts == 0:  # a round records what it sent
        assert time.monotonic() < deadline, "the delivery was never tried"
        deliver_due(stack.db, settings, resolver=resolver)
    return row
