"""Webhook URLs that no delivery could be sent to (found by bench/fuzz_api.py).

The API took any string starting with http(s)://, and httpx raises InvalidURL (not an HTTPError)
for some of them: in service/webhooks.py that escaped the send, ended `deliver_due` before it
recorded any result of its batch, and so every round re-sent the other endpoints' deliveries too.
(Addresses webhooks may not reach: tests/service/test_webhook_policy.py.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.netguard import TargetPolicy, system_resolver
from service.settings import load_settings
from service.webhook_delivery import Claimed, Result
from service.webhook_sender import make_client, send_one
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
    response = team.post("/v1/webhooks", json={"url": "http://93.184.215.14:9/hook"})
    assert response.status_code == 200, response.text


def test_a_stored_unparseable_url_fails_its_own_delivery_only(tmp_path: Path) -> None:
    """A row stored before the API checked (or written by hand) is one failed attempt, not an error
    that ends the whole batch."""
    item = Claimed("whdel_1", 1, "team", "evt_1", '{"id": "evt_1"}', UNSENDABLE[0], ["whsec_" + "A" * 44])
    settings = load_settings(home=tmp_path, webhook_timeout_s=1)

    async def send() -> Result:
        async with make_client(settings) as client:
            return await send_one(client, item, settings, TargetPolicy(), system_resolver)

    result = asyncio.run(send())
    assert not result.ok
    assert result.code is None
    assert result.error is not None and result.error.startswith("InvalidURL")
