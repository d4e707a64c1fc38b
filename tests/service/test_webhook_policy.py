"""Where webhooks may connect (service/netguard.py): a table of hosts and DNS answers against the
policy, the API refusing internal targets at registration, and real deliveries that never reach a
refused address, even when the name's second lookup would point there (DNS rebinding).

DNS answers are the one thing faked (a resolver function): the listeners, the HTTP client, the
database and the API are real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.netguard import TargetPolicy, TargetRefused, TargetUnresolved, check_registration
from service.settings import load_settings
from service.webhook_delivery import Claimed, Result
from service.webhook_sender import make_client, send_one
from tests.service.conftest import Stack
from tests.service.webhook_helpers import deliver_until_tried, listening, pending_delivery, stored_endpoint

PUBLIC_V4, PUBLIC_V6 = "93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


class FakeDNS:
    """A resolver with fixed answers per name; each lookup of a name takes its next answer (the
    last one repeats). An unknown name does not resolve."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    def __call__(self, host: str) -> list[str]:
        self.lookups.append(host)
        if host not in self.answers:
            raise OSError(f"{host}: Name or service not known")
        seq = self.answers[host]
        return seq[min(self.lookups.count(host), len(seq)) - 1]


DNS: dict[str, list[list[str]]] = {
    "public.example": [[PUBLIC_V4]],
    "public6.example": [[PUBLIC_V6]],
    "private.example": [["10.1.2.3"]],
    "loopback.example": [["127.0.0.1", "::1"]],
    "metadata.example": [["169.254.169.254"]],
    "mixed.example": [["10.0.0.1", PUBLIC_V4]],  # only the public address may be used
    "mapped.example": [["::ffff:10.0.0.1"]],
    "ula.example": [["fd12::1"]],
    "cgnat.example": [["100.64.1.1"]],
    "empty.example": [[]],
    "localhost": [["127.0.0.1"]],
    "metadata.google.internal": [["169.254.169.254"]],
}
# (host, allow-list, expected): "ok" | "refused" | "unresolved"
TABLE = [
    # IPv4 literals, in every spelling inet_aton reads
    ("127.0.0.1", "", "refused"), ("127.1", "", "refused"), ("2130706433", "", "refused"),
    ("0x7f000001", "", "refused"), ("0x7f.1", "", "refused"), ("0177.0.0.1", "", "refused"),
    ("017700000001", "", "refused"), ("127.0.0.1.", "", "refused"), ("0", "", "refused"),
    ("0.0.0.0", "", "refused"), ("10.0.0.1", "", "refused"), ("172.16.5.4", "", "refused"),
    ("172.31.255.255", "", "refused"), ("192.168.0.1", "", "refused"), ("169.254.169.254", "", "refused"),
    ("100.64.0.1", "", "refused"), ("192.0.2.1", "", "refused"), ("198.18.0.1", "", "refused"),
    ("224.0.0.1", "", "refused"), ("239.255.255.250", "", "refused"), ("240.0.0.1", "", "refused"),
    ("255.255.255.255", "", "refused"), ("0xa9.0xfe.0xa9.0xfe", "", "refused"),
    (PUBLIC_V4, "", "ok"), ("172.32.0.1", "", "ok"), ("1.1.1.1", "", "ok"),
    # IPv6, bracketed or not, and the forms that carry an IPv4 address
    ("::1", "", "refused"), ("[::1]", "", "refused"), ("::", "", "refused"), ("fe80::1", "", "refused"),
    ("fe80::1%eth0", "", "refused"), ("fd00::1", "", "refused"), ("fc00::1", "", "refused"),
    ("ff02::1", "", "refused"), ("fec0::1", "", "refused"), ("2001:db8::1", "", "refused"),
    ("::ffff:127.0.0.1", "", "refused"), ("[::ffff:127.0.0.1]", "", "refused"),
    ("::ffff:7f00:1", "", "refused"), ("::ffff:169.254.169.254", "", "refused"),
    ("::127.0.0.1", "", "refused"), ("64:ff9b::127.0.0.1", "", "refused"),
    ("64:ff9b::10.0.0.1", "", "refused"), ("64:ff9b:1::a00:1", "", "refused"),
    ("2002:7f00:1::1", "", "refused"), ("2002:a9fe:a9fe::1", "", "refused"),
    (PUBLIC_V6, "", "ok"), ("64:ff9b::" + PUBLIC_V4, "", "ok"),
    # names, resolved
    ("public.example", "", "ok"), ("public6.example", "", "ok"), ("mixed.example", "", "ok"),
    ("private.example", "", "refused"), ("loopback.example", "", "refused"),
    ("metadata.example", "", "refused"), ("mapped.example", "", "refused"), ("ula.example", "", "refused"),
    ("cgnat.example", "", "refused"), ("localhost", "", "refused"),
    ("metadata.google.internal", "", "refused"), ("nowhere.example", "", "unresolved"),
    ("empty.example", "", "unresolved"),
    # the operator's allow-list
    ("127.0.0.1", "127.0.0.0/8", "ok"), ("2130706433", "127.0.0.0/8", "ok"),
    ("127.9.9.9", "127.0.0.0/8", "ok"),
    ("::ffff:127.0.0.1", "127.0.0.0/8", "ok"), ("localhost", "127.0.0.0/8", "ok"),
    ("loopback.example", "127.0.0.0/8", "ok"), ("::1", "127.0.0.0/8", "refused"),
    ("10.0.0.1", "127.0.0.0/8", "refused"), ("private.example", "10.1.0.0/16, fd00::/8", "ok"),
    ("ula.example", "10.1.0.0/16,fd00::/8", "ok"), ("169.254.169.254", "10.0.0.0/8", "refused"),
]  # fmt: skip


@pytest.mark.parametrize(("host", "allow", "expected"), TABLE)
def test_target_policy_table(host: str, allow: str, expected: str) -> None:
    policy = TargetPolicy.from_text(allow)
    dns = FakeDNS(DNS)
    try:
        addresses = policy.check(host, dns)
        outcome = "ok"
    except TargetRefused:
        outcome = "refused"
    except TargetUnresolved:
        outcome = "unresolved"
    assert outcome == expected, (host, allow)
    if outcome == "ok":
        assert addresses and all(policy.admits(a) for a in addresses)
        if host == "mixed.example":
            assert [str(a) for a in addresses] == [PUBLIC_V4]


def test_registration_refuses_internal_names_even_when_they_do_not_resolve() -> None:
    policy = TargetPolicy()
    for host in ("metadata", "metadata.google.internal", "printer.local", "x.localhost", "db.internal"):
        with pytest.raises(TargetRefused):
            check_registration(host, policy, FakeDNS({}))
    check_registration("hooks.example.invalid", policy, FakeDNS({}))  # may resolve later: re-checked then


def test_an_invalid_allow_list_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TUNEPOOL_WEBHOOK_ALLOW_CIDRS: '10\.0\.0\.0/33'"):
        load_settings(home=tmp_path, webhook_allow_cidrs="127.0.0.0/8,10.0.0.0/33")


REFUSED_URLS = [
    "http://127.0.0.1/hook", "http://localhost:8000/v1/admin/teams", "http://169.254.169.254/latest/meta-data",
    "http://10.0.0.1/", "http://[::1]/", "http://0.0.0.0:8000/", "http://metadata.google.internal/",
    "http://[fd00::1]/", "http://2130706433/", "http://0x7f.1/", "http://127.1/", "https://[::ffff:127.0.0.1]/",
    "http://[64:ff9b::7f00:1]/", "http://metadata/computeMetadata/v1/", "http://192.168.1.1:8080/",
]  # fmt: skip


def test_the_api_refuses_internal_targets(stack: Stack) -> None:
    team = stack.team()
    for url in REFUSED_URLS:
        response = team.post("/v1/webhooks", json={"url": url})
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["param"] == "url" and error["code"] == "url_not_allowed", error
        assert "TUNEPOOL_WEBHOOK_ALLOW_CIDRS" in error["message"]
    assert team.get("/v1/webhooks").json()["data"] == []
    for url in ("https://hooks.example.invalid/x", f"https://{PUBLIC_V4}/x", f"https://[{PUBLIC_V6}]:8443/x"):
        assert team.post("/v1/webhooks", json={"url": url}).status_code == 200, url


def _send(settings_home: Path, url: str, allow: str, dns: FakeDNS) -> Result:
    settings = load_settings(home=settings_home, webhook_timeout_s=2, webhook_allow_cidrs=allow)
    item = Claimed("whdel_x", 1, "team", "evt_x", '{"id":"evt_x"}', url, ["whsec_" + "A" * 44])

    async def send() -> Result:
        async with make_client(settings) as client:
            return await send_one(client, item, settings, TargetPolicy.from_text(allow), dns)

    return asyncio.run(send())


def test_the_connection_goes_to_the_checked_address(tmp_path: Path) -> None:
    """The name's first answer is checked and used; its second answer (the rebinding) is never
    asked for, nor connected to. The name exists only in the fake DNS: had the HTTP client resolved
    it again itself, nothing would have been reached."""
    with listening("127.0.0.2") as checked, listening("127.0.0.1") as internal:
        dns = FakeDNS({"rebind.example": [["127.0.0.2"], ["127.0.0.1"]]})
        result = _send(tmp_path, checked.url("rebind.example"), "127.0.0.2/32", dns)
        assert result.ok, result
        assert dns.lookups == ["rebind.example"]
        [(headers, _)] = checked.received
        assert headers["host"] == f"rebind.example:{checked.port}"  # the name, not the address
        assert internal.connections == 0

        # Public on the first lookup, loopback on the second: the public address is the one tried.
        dns = FakeDNS({"rebind.example": [[PUBLIC_V4], ["127.0.0.1"]]})
        result = _send(tmp_path, internal.url("rebind.example"), "", dns)
        assert not result.ok and dns.lookups == ["rebind.example"]
        assert internal.connections == 0 and internal.received == []


def test_a_delivery_to_a_refused_target_never_reaches_it(stack: Stack) -> None:
    """Rows stored before the check existed (or a name whose DNS changed since registration): each
    attempt is refused before any connection, and its error says so without a word from the target."""
    team = stack.team()
    settings = stack.settings.model_copy(update={"webhook_allow_cidrs": ""})
    # First, a closed port of an allowed address: there the error does say what happened.
    endpoint_id, _ = stored_endpoint(stack, team, "http://127.0.0.1:9/hook")
    allowed = stack.settings.model_copy(update={"webhook_allow_cidrs": "127.0.0.0/8"})
    row = deliver_until_tried(stack, allowed, pending_delivery(stack, endpoint_id))
    assert row.last_error is not None and row.last_error.startswith("ConnectError"), row.last_error
    with listening("127.0.0.1") as target:
        dns = FakeDNS({"changed.example": [["127.0.0.1"]], "localhost": [["127.0.0.1", "::1"]]})
        for url in (
            target.url(),
            target.url("localhost"),
            target.url("2130706433"),
            target.url("changed.example"),
        ):
            endpoint_id, _ = stored_endpoint(stack, team, url)
            row = deliver_until_tried(stack, settings, pending_delivery(stack, endpoint_id), resolver=dns)
            assert row.status == "pending" and row.attempts == 1 and row.last_response_code is None, url
            assert row.last_error is not None and row.last_error.startswith("refused: "), row.last_error
            assert "TUNEPOOL_WEBHOOK_ALLOW_CIDRS" in row.last_error
            assert "onnect" not in row.last_error and str(target.port) not in row.last_error
        assert target.connections == 0 and target.received == []
