"""API keys never appear in an answer or in the API's log: good, revoked, near-miss and made-up keys,
sent in well-formed and malformed Authorization headers, and pasted where an id, a cursor, a model
name or a form field goes (errors quote those). Every answer and the whole log are searched for every
key and for its secret part."""

from __future__ import annotations

import secrets
import socket
import string
from urllib.parse import urlsplit

import httpx

from service.auth import generate_key
from tests.service.conftest import Stack, upload
from tests.service.helpers import ensure_model, new_file

_ALNUM = string.ascii_letters + string.digits
AUTHENTICATED = [
    ("GET", "/v1/files"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/admin/teams"),
]


def secret_parts(key: str) -> list[str]:
    """The strings that must not leak for `key`: itself, and its secret part once the visible
    prefix (`tp-` and 8 characters, shown in listings) is cut off."""
    return [key, key[12:]] if key.startswith("tp-") and len(key) > 20 else [key]


def assert_nowhere(response: httpx.Response, keys: list[str]) -> None:
    seen = response.text + "".join(f"{k}: {v}\n" for k, v in response.headers.items())
    for key in keys:
        for part in secret_parts(key):
            assert part not in seen, (response.request.method, str(response.request.url)[:80], response.text)


def raw_header_request(stack: Stack, header: bytes) -> bytes:
    """A request whose Authorization header holds bytes httpx would refuse to send (NUL, CR, 8-bit)."""
    url = urlsplit(stack.url)
    with socket.create_connection((url.hostname or "", url.port or 80), timeout=10) as sock:
        sock.sendall(b"GET /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: " + header + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_keys_never_appear_in_answers_or_the_log(stack: Stack) -> None:
    team, admin = stack.team(), stack.team(admin=True)
    file_id = new_file(team)
    ensure_model(stack)
    created = admin.post(f"/v1/admin/teams/{team.name}/keys")
    revoked = created.json()["key"]  # the one answer that shows a key: the one that created it
    assert admin.post(f"/v1/admin/keys/{revoked[:11]}/revoke").status_code == 200
    near_miss = team.key[:12] + "".join(secrets.choice(_ALNUM) for _ in range(40))  # right prefix
    made_up = generate_key()[0]
    key_shaped = [team.key, admin.key, revoked, near_miss, made_up]
    garbage = ["sk-" + secrets.token_hex(24), "tp-" + secrets.token_hex(30), secrets.token_urlsafe(32)]
    keys = key_shaped + garbage

    # In the Authorization header, well-formed and not.
    for key in keys:
        headers = [
            f"Bearer {key}",
            f"bearer  {key}",
            key,
            f"Basic {key}",
            f"Token {key}",
            f"Bearer {key}{key}",
        ]
        headers += [f"Bearer {key[:-1]}", f"Bearer {key}x", f"Bearer\t{key}", f"Bearer {key}, Bearer {key}"]
        for header in headers:
            with httpx.Client(base_url=stack.url, headers={"Authorization": header}) as http:
                for method, path in AUTHENTICATED:
                    response = http.request(method, path, json={} if method == "POST" else None)
                    assert response.status_code in (200, 401, 403, 400, 404), response.text
                    assert_nowhere(response, keys)
        for tail in (b"\x00", b"\r", b"\xff", b"\x00" + key.encode()):
            answer = raw_header_request(stack, b"Bearer " + key.encode() + tail)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]  # refused or dropped
            assert not any(part.encode() in answer for k in keys for part in secret_parts(k)), answer

    # Pasted where an id, a cursor, a name or a field goes, by a caller with a valid key.
    job = team.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-test-model", "training_file": file_id, "method": {"type": "dft"}},
    ).json()["id"]
    for key in key_shaped:
        requests: list[tuple[httpx.Client, str, str, object]] = [
            (team.http, "GET", f"/v1/files/{key}", None),
            (team.http, "GET", f"/v1/files/{key}/content", None),
            (team.http, "DELETE", f"/v1/files/{key}", None),
            (team.http, "GET", f"/v1/files/{key}%00", None),  # PostgreSQL refuses it: the DataError path
            (team.http, "GET", f"/v1/files?after={key}", None),
            (team.http, "GET", f"/v1/files?limit={key}", None),
            (team.http, "GET", f"/v1/fine_tuning/jobs/{key}", None),
            (team.http, "POST", f"/v1/fine_tuning/jobs/{key}/cancel", None),
            (team.http, "GET", f"/v1/fine_tuning/jobs?after={key}", None),
            (team.http, "GET", f"/v1/fine_tuning/jobs?status={key}", None),
            (team.http, "GET", f"/v1/fine_tuning/jobs/{job}/events?after={key}", None),
            (team.http, "GET", f"/v1/fine_tuning/jobs/{job}/checkpoints/{key}/content", None),
            (team.http, "GET", f"/v1/fine_tuning/jobs/{job}/metrics?after_step={key}", None),
            (team.http, "GET", f"/v1/models/{key}", None),
            (team.http, "GET", f"/v1/models/ft:x:y:{key}", None),
            (team.http, "DELETE", f"/v1/webhooks/{key}", None),
            (team.http, "POST", "/v1/webhooks", {"url": key}),
            (team.http, "POST", "/v1/webhooks", {"url": "https://x.invalid", "events": [key]}),
            (admin.http, "GET", f"/v1/admin/teams/{key}", None),
            (admin.http, "POST", f"/v1/admin/keys/{key}/revoke", None),
            (admin.http, "DELETE", f"/v1/admin/models/{key}", None),
        ]
        body = {"model": "tiny-test-model", "training_file": file_id, "method": {"type": "dft"}}
        for field, value in (("model", key), ("training_file", key), ("validation_file", key),
                             ("model", f"ft:tiny-test-model:{team.name}:{key}"), ("pool", key),
                             ("method", {"type": key}), ("hyperparameters", {"n_epochs": key}),
                             ("metadata", {key: key * 20}), ("suffix", key + "/")):  # fmt: skip
            requests.append((team.http, "POST", "/v1/fine_tuning/jobs", {**body, field: value}))
        for client, method, path, json_body in requests:
            response = client.request(method, path, json=json_body)
            assert response.status_code in (400, 404, 405, 409), (path, response.text)
            assert_nowhere(response, keys)
        with_idempotency = team.post("/v1/fine_tuning/jobs", json={}, headers={"Idempotency-Key": key})
        assert_nowhere(with_idempotency, keys)
        for purpose in (key, key * 3):
            response = team.post("/v1/files", files={"file": ("t.jsonl", b"{}\n")}, data={"purpose": purpose})
            assert response.status_code == 400
            assert_nowhere(response, keys)
        assert_nowhere(upload(team, key.encode() + b"\n"), keys)  # a bad line quoted in the 400

    log = (stack.settings.home / "api.log").read_text(errors="replace")
    assert "Application startup complete" in log  # the right file
    for key in keys:
        for part in secret_parts(key):
            assert part not in log
