"""Security headers (service/security_headers.py), the dashboard's sign-in Origin check
(service/api/ui.py) and the /metrics scrape token (service/metrics.py), against real API processes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import Stack, running_stack
from tests.service.helpers import new_job

SCRAPE_TOKEN = "scrape-" + "t0k3n" * 8


def assert_common(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"


def assert_page(response: httpx.Response) -> None:
    assert_common(response)
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert response.headers["x-frame-options"] == "DENY"


def test_api_answers_carry_the_headers_and_are_never_stored(stack: Stack) -> None:
    team = stack.team()
    answers = [
        stack.client().get("/healthz"),
        team.get("/v1/files"),
        team.get("/v1/fine_tuning/jobs/ftjob-none"),  # 404
        stack.client().get("/v1/files"),  # 401
        team.post("/v1/fine_tuning/jobs", content=b"{", headers={"Content-Type": "application/json"}),  # 400
    ]
    assert [a.status_code for a in answers] == [200, 200, 404, 401, 400]
    for answer in answers:
        assert_common(answer)
        assert answer.headers["cache-control"] == "no-store"
        assert "content-security-policy" not in answer.headers  # JSON needs no page policy


def test_answers_that_carry_a_key_or_secret_are_no_store(stack: Stack) -> None:
    admin = stack.team(admin=True)
    name = f"hdr-{stack.backend}"
    team = admin.post("/v1/admin/teams", json={"name": name})
    assert team.status_code == 200 and team.json()["api_key"]["key"].startswith("tp-")
    key = admin.post(f"/v1/admin/teams/{name}/keys")
    assert key.status_code == 200 and key.json()["key"].startswith("tp-")
    hook = stack.team().post("/v1/webhooks", json={"url": "http://93.184.215.14:9/hook"})
    assert hook.status_code == 200 and hook.json()["secret"].startswith("whsec_")
    for answer in (team, key, hook):
        assert answer.headers["cache-control"] == "no-store"
        assert_common(answer)


def test_dashboard_pages_have_a_strict_policy_and_need_no_inline_code(stack: Stack) -> None:
    team = stack.team()
    job = new_job(stack, team)
    browser = stack.client()
    login = browser.get("/ui/login")
    assert login.status_code == 200
    signed_in = browser.post("/ui/login", data={"api_key": team.key, "next": "/ui"}, follow_redirects=True)
    assert signed_in.status_code == 200  # followed the redirect to /ui
    job_page = browser.get(f"/ui/jobs/{job['id']}")
    assert job_page.status_code == 200 and 'name="csrf"' in job_page.text  # carries the form token
    for page in (login, signed_in, job_page, browser.get("/ui?partial=true")):
        assert_page(page)
        assert page.headers["cache-control"] == "no-store"
        # What the policy would block: inline scripts, inline event handlers, style attributes.
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text), "an inline <script>"
        assert not re.search(r"\son[a-z]+\s*=", page.text), "an inline event handler"
        assert not re.search(r"\sstyle\s*=|<style", page.text), "an inline style"
    static = browser.get("/ui/static/app.js")
    assert static.status_code == 200
    assert_page(static)
    assert "cache-control" not in static.headers  # the static files stay cacheable (ETag)


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a privacy redirect
        {"Origin": "http://127.0.0.1:1"},  # our host, another port: another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain is another site's page too
        {"Sec-Fetch-Site": "cross-site", "Origin": "SELF"},  # the browser's word wins
    ],
)
def test_a_cross_site_sign_in_is_refused_and_sets_no_cookie(stack: Stack, headers: dict[str, str]) -> None:
    team = stack.team()
    headers = {name: stack.url if value == "SELF" else value for name, value in headers.items()}
    response = stack.client().post(
        "/ui/login", data={"api_key": team.key, "next": "/ui"}, headers=headers, follow_redirects=False
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "cross_site_request"
    assert "set-cookie" not in response.headers


def test_same_origin_and_plain_sign_ins_still_work(stack: Stack) -> None:
    team = stack.team()
    for headers in (
        {"Origin": stack.url, "Sec-Fetch-Site": "same-origin"},  # the dashboard's own form
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},  # the same, under a no-referrer policy
        {"Origin": stack.url},  # a browser that sends no Sec-Fetch-Site
        {"Sec-Fetch-Site": "none"},  # typed or bookmarked by the user
        {},  # curl
    ):
        response = stack.client().post(
            "/ui/login", data={"api_key": team.key, "next": "/ui"}, headers=headers, follow_redirects=False
        )
        assert response.status_code == 303, (headers, response.text)
        assert "tunepool_key=" in response.headers["set-cookie"]


def test_metrics_are_open_without_a_token(stack: Stack) -> None:
    team = stack.team()
    new_job(stack, team)
    response = stack.client().get("/metrics")
    assert response.status_code == 200
    assert f'team="{team.name}"' in response.text  # what an open /metrics shows anyone
    assert_common(response)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("metrics-token")
    with running_stack("sqlite", Path(home), {"TUNEPOOL_METRICS_TOKEN": SCRAPE_TOKEN}) as stack:
        yield stack


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        f"Bearer {SCRAPE_TOKEN[:-1]}",
        f"Bearer {SCRAPE_TOKEN}x",
        SCRAPE_TOKEN,
        f"Basic {SCRAPE_TOKEN}",
    ],
)
def test_metrics_with_a_token_refuse_anything_else(scraped: Stack, authorization: str | None) -> None:
    team = scraped.team()
    new_job(scraped, team)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = scraped.client().get("/metrics", headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert "tunepool_" not in response.text and team.name not in response.text
    assert response.json()["error"]["code"] == "invalid_metrics_token"


def test_metrics_with_a_token_answer_the_scraper(scraped: Stack) -> None:
    team = scraped.team()
    new_job(scraped, team)
    response = scraped.client().get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
    assert response.status_code == 200
    assert f'team="{team.name}"' in response.text
    # A team's API key is no scrape token.
    assert team.get("/metrics").status_code == 401
