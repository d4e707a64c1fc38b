"""Bad keys are rate limited per client address (service/ratelimit.py): past the limit they answer
429 with Retry-After and an OpenAI-style body, while a valid key from the same address keeps working
and another address is not affected. The limiter itself: sliding window, bounded memory."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from service.auth import generate_key
from service.ratelimit import FailureLimiter, client_address, retry_after_header
from tests.service.conftest import running_stack


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_sliding_window_of_failures_per_client() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 10.0, clock=clock)
    for t in (0, 4, 8):
        clock.now = 1000 + t
        assert limiter.record_failure("a") is None
    clock.now = 1009
    assert limiter.record_failure("a") == 1.0  # until the failure at t=0 is 10 s old
    assert limiter.record_failure("b") is None  # another client has its own window
    for _ in range(50):  # refused failures are not counted: hammering does not extend the wait
        assert limiter.record_failure("a") == 1.0
    clock.now = 1010.5
    assert limiter.record_failure("a") is None  # t=0 aged out; now t=4, 8, 10.5
    clock.now = 1011
    assert limiter.record_failure("a") == 3.0  # until t=4 ages out
    assert FailureLimiter(0, 10.0, clock=clock).record_failure("a") is None  # 0: off


def test_memory_is_bounded_and_idle_clients_go_first() -> None:
    clock = Clock()
    limiter = FailureLimiter(2, 60.0, max_clients=100, clock=clock)
    for i in range(1000):  # a flood from many addresses
        limiter.record_failure(f"10.0.{i // 256}.{i % 256}")
    assert limiter.tracked_clients() <= 100
    # The newest flooder is still tracked (the longest-tracked went): its 2nd failure passes, its 3rd not.
    assert limiter.record_failure("10.0.3.231") is None
    assert limiter.record_failure("10.0.3.231") is not None
    clock.now += 61  # everyone's failures aged out: a new client makes room by dropping them all
    assert limiter.record_failure("192.0.2.1") is None
    assert limiter.tracked_clients() == 1


def test_clients_are_ipv4_addresses_or_ipv6_64s() -> None:
    assert client_address("203.0.113.7") == "203.0.113.7"
    assert (
        client_address("2001:db8:1:2:aaaa::1")
        == client_address("2001:db8:1:2:ffff::9")
        == "2001:db8:1:2::/64"
    )
    assert client_address("2001:db8:1:3::1") != client_address("2001:db8:1:2::1")
    assert client_address("") == "" and client_address("not:an:address") == "not:an:address"


def test_retry_after_is_whole_seconds_and_never_zero() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.2, 1.0, 3.2, 59.9)] == ["1", "1", "1", "4", "60"]


def test_bad_keys_are_limited_per_address_and_good_keys_never(tmp_path: Path) -> None:
    window = 3.0
    env = {"TUNEPOOL_AUTH_FAILURE_LIMIT": "5", "TUNEPOOL_AUTH_FAILURE_WINDOW_S": str(window)}
    with running_stack("sqlite", tmp_path, env) as stack:
        good = stack.team()
        bad = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {generate_key()[0]}"})
        for _ in range(30):  # valid keys are never counted
            assert good.get("/v1/files").status_code == 200
        started = time.monotonic()
        for _ in range(5):
            response = bad.get("/v1/files")
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        limited = bad.get("/v1/fine_tuning/jobs/ftjob-x")
        assert limited.status_code == 429, limited.text
        assert 1 <= int(limited.headers["retry-after"]) <= window
        error = limited.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "rate_limited", None)
        malformed = bad.get("/v1/files", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert malformed.status_code == 429  # a bad header is a bad key too
        assert bad.get("/v1/files", headers={"Authorization": ""}).status_code == 401  # none: not a guess

        # The same address with a valid key: unaffected, on the poll and on writes.
        assert good.get("/v1/files").status_code == 200
        assert good.get("/v1/fine_tuning/jobs/ftjob-x").status_code == 404
        assert good.post("/v1/webhooks", json={"url": "https://example.invalid/h"}).status_code == 200
        assert bad.get("/v1/files").status_code == 429  # and the bad key is still limited
        # The dashboard's sign-in checks keys the same way: no way around the limit there.
        assert bad.post("/ui/login", data={"api_key": generate_key()[0]}).status_code == 429
        assert bad.post("/ui/login", data={"api_key": good.key}).status_code == 303

        # Another client address (all of 127/8 is this machine): its own budget.
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=stack.url, transport=other, headers=bad.headers) as elsewhere:
            assert elsewhere.get("/v1/files").status_code == 401
        with httpx.Client(base_url=stack.url, transport=httpx.HTTPTransport(local_address="127.0.0.3")) as c:
            assert c.get("/v1/files", headers={"Authorization": f"Bearer {good.key}"}).status_code == 200

        # Once the window has passed, the address may fail again (and is limited again after 5).
        time.sleep(max(started + window + 0.2 - time.monotonic(), 0))
        assert bad.get("/v1/files").status_code == 401
        bad.close()
