"""Webhook URLs that no delivery could be sent to (found by bench/fuzz_api.py).

The API took any string starting with http(s)://, and httpx raises InvalidURL (not an HTTPError)
for some of them: in service/webhooks.py that escaped `_send`, ended `deliver_due` before it
recorded any result of its batch, and so every round re-sent the other endpoints' deliveries too.
"""

from __future__ import annotations

import httpx
import pytest

from service.webhooks import _Claimed, _send
from tests.service.conftest import Stack

UNSENDABLE = [
    "http://\x00example.com/hook",  # httpx: non-printable character
    "https://ex\u00e9\u2028ample.com/",  # httpx: invalid IDNA host name
    "https://[example.com/hook",  # urllib: invalid IPv6 URL
    "https:///only/a/path",  # no host at all
]


@pytest.mark.parametrize("url", UNSENDABLE)
def test_the_api_refuses_a_url_no_delivery_could_use(stack: Stack, url: str) -> None:
    team = stack.team()
    response = team.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "url"
    assert team.get("/v1/webhooks").json()["data"] == []


def test_a_sendable_url_is_still_accepted(stack: Stack) -> None:
    team = stack.team()
    response = team.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
    assert response.status_code == 200, response.text


def test_a_stored_unparseable_url_fails_its_own_delivery_only() -> None:
    """A row stored before the API checked (or written by hand) is one failed attempt, not an error
    that ends the whole batch."""
    item = _Claimed("whdel_1", 1, "evt_1", '{"id": "evt_1"}', UNSENDABLE[0], "whsec_" + "A" * 44)
    with httpx.Client(timeout=1) as client:
        result = _send(client, item)
    assert not result.ok
    assert result.code is None
    assert result.error is not None and result.error.startswith("InvalidURL")
