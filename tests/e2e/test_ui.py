"""The web dashboard in headless Chromium (Debian's, driven by Playwright) against a running stack
with a finished DFT job and a finished SFT job on the same data: sign in, the jobs table, a job's
live charts drawn from its metrics, the SFT overlay, a checkpoint download, cancel, the Pool page.
Screenshots go to test-output/ui/."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from service.models import Worker
from tests.e2e.conftest import System
from tests.service.conftest import ROOT
from tests.service.helpers import set_job
from tests.worker.training.conftest import chat_rows

SHOTS = ROOT / "test-output" / "ui"
MAIN_COLOR = (0x25, 0x63, 0xEB)  # the page's own job (app.js PALETTE[0])
OVERLAY_COLOR = (0xDC, 0x26, 0x26)  # the first overlay (PALETTE[1])
# Chromium as the environment's probe found it to work on this closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: `scripts/setup.sh --browser` (make test) installs Debian's"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def colored_pixels(page: Page, chart_id: str, rgb: tuple[int, int, int]) -> int:
    """Pixels of a chart's canvas within a few levels of `rgb`: a drawn line has hundreds."""
    return int(
        page.evaluate(
            """([id, [r, g, b]]) => {
                const canvas = document.querySelector(`#${id} canvas`);
                if (!canvas) return 0;
                const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
                let n = 0;
                for (let i = 0; i < px.length; i += 4)
                    if (Math.abs(px[i] - r) < 12 && Math.abs(px[i + 1] - g) < 12
                        && Math.abs(px[i + 2] - b) < 12 && px[i + 3] > 200) n++;
                return n;
            }""",
            [chart_id, list(rgb)],
        )
    )


def train_two_jobs(system: System) -> tuple[Any, str, str]:
    system.start_worker()
    client = system.team(name="ui-team")
    train = system.new_file(client, n=16)
    valid = system.new_file(client, content="".join(json.dumps(r) + "\n" for r in chat_rows(4, 7)).encode())
    hp = {"checkpoint_every": 2, "eval_every": 2}
    dft = system.submit(client, train, validation_file=valid, suffix="dft-run", hyperparameters=hp)
    # The same run with the SFT loss: same file, same hyperparameters.
    sft_hp = {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "max_seq_length": 128, **hp}
    sft_method = {"type": "supervised", "supervised": {"hyperparameters": sft_hp}}
    sft = system.submit(client, train, validation_file=valid, suffix="sft-run", method=sft_method)
    for job in (dft, sft):
        done = system.wait(client, job["id"])
        assert done["status"] == "succeeded", (done, system.events(client, job["id"]), system.worker_logs())
    return client, dft["id"], sft["id"]


# What Chromium reports of the pages' Content-Security-Policy (service/security_headers.py) blocking
# something: the dashboard must need nothing it refuses (no inline script or style).
CSP_VIOLATIONS: list[str] = []


@pytest.fixture(autouse=True)
def no_csp_violations() -> Iterator[None]:
    CSP_VIOLATIONS.clear()
    yield
    assert not CSP_VIOLATIONS, CSP_VIOLATIONS


def sign_in(page: Page, url: str, key: str) -> None:
    def note_csp(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            CSP_VIOLATIONS.append(message.text)

    page.on("console", note_csp)
    page.goto(f"{url}/ui")
    assert "/ui/login" in page.url  # not signed in yet: the jobs page redirects
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/ui")


@pytest.mark.parametrize("system", ["postgresql"], indirect=True)
def test_dashboard_table_charts_overlay_and_download(system: System, browser: Browser) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    client, dft_id, sft_id = train_two_jobs(system)
    url = system.stack.url
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # A wrong key: a 401 page that says so, and no cookie.
    page.goto(f"{url}/ui/login")
    page.fill("#api_key", "tp-notakey1-" + "x" * 40)
    response = page.expect_response(lambda r: r.url.endswith("/ui/login") and r.request.method == "POST")
    with response as info:
        page.click("button[type=submit]")
    assert info.value.status == 401
    assert "not valid" in page.inner_text("p.error")

    sign_in(page, url, client.key)
    assert client.key not in page.evaluate("document.cookie")  # HttpOnly: page scripts never see it
    rows = page.locator("tr.job-row")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)")) == sorted([dft_id, sft_id])
    dft_row = page.locator(f"tr[data-job-id='{dft_id}']")
    assert dft_row.locator(".status").inner_text() == "succeeded"
    assert dft_row.locator(".method").inner_text() == "DFT"
    assert page.locator(f"tr[data-job-id='{sft_id}'] .method").inner_text() == "SFT"
    assert "4/4" in dft_row.inner_text() and "ago" in dft_row.inner_text()
    page.screenshot(path=str(SHOTS / "jobs.png"), full_page=True)

    # Filtering by loss mode keeps only that mode's jobs.
    page.select_option("select[name=method]", "supervised")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**method=supervised**")
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)") == [sft_id]
    page.goto(f"{url}/ui")

    # The DFT job's page: its charts are drawn from its metrics.
    page.click(f"a[href='/ui/jobs/{dft_id}']")
    page.wait_for_selector("#job[data-charts-ready='1']")
    api_metrics = client.get(f"/v1/fine_tuning/jobs/{dft_id}/metrics").json()["data"]
    page_rows = page.evaluate("window.tunepool.main.rows")
    assert [r["step"] for r in page_rows] == [m["step"] for m in api_metrics] == [1, 2, 3, 4]
    assert [r["loss"] for r in page_rows] == [m["data"]["loss"] for m in api_metrics]
    for chart in ("chart-loss", "chart-nll", "chart-token_accuracy", "chart-valid_loss"):
        assert colored_pixels(page, chart, MAIN_COLOR) > 50, chart
        assert colored_pixels(page, chart, OVERLAY_COLOR) == 0, chart
    page.wait_for_selector("ol.events li:has-text('succeeded')")
    page.screenshot(path=str(SHOTS / "dft-job.png"), full_page=True)

    # Overlay the SFT job on the same file: a second line on every chart, named in the legend.
    page.click("#overlay summary")
    toggle = page.locator(f".overlay-toggle[value='{sft_id}']")
    assert "same training file" in page.locator("#overlay li", has=toggle).inner_text()
    toggle.check()
    page.wait_for_selector("#job[data-overlays='1']")
    page.screenshot(path=str(SHOTS / "dft-vs-sft.png"), full_page=True)
    sft_metrics = client.get(f"/v1/fine_tuning/jobs/{sft_id}/metrics").json()["data"]
    for metric in ("loss", "nll", "token_accuracy", "valid_loss"):
        chart = f"chart-{metric}"
        # Both jobs are the chart's series, with their own values, and the overlay's line is drawn.
        # (Which pixels of the page's job stay visible depends on the data: the overlay is drawn over
        # it, and two runs of a tiny model from the same weights can have near-identical curves.)
        series = page.evaluate(f"window.tunepool.charts.plots.get('{metric}').data.slice(1)")
        for drawn, rows in zip(series, (api_metrics, sft_metrics), strict=True):
            expected = [m["data"].get(metric) for m in rows]
            assert [v for v in drawn if v is not None] == [v for v in expected if v is not None], chart
        assert colored_pixels(page, chart, OVERLAY_COLOR) > 50, chart
    assert sft_id in page.inner_text("#chart-loss .u-legend")
    page.check("#log-scale")  # DFT's objective is far below SFT's: on a log axis both lines have shape
    for chart in ("chart-loss", "chart-valid_loss"):
        pixels = colored_pixels(page, chart, OVERLAY_COLOR), colored_pixels(page, chart, MAIN_COLOR)
        assert min(pixels) > 50, (chart, pixels)
    page.screenshot(path=str(SHOTS / "dft-vs-sft.png"), full_page=True)

    # A checkpoint link downloads the same archive the API serves.
    link = page.locator("a.download").first
    href = link.get_attribute("href")
    assert href is not None
    fetched = page.request.get(f"{url}{href}")
    assert fetched.status == 200 and fetched.headers["content-type"] == "application/x-tar"
    with page.expect_download() as download_info:
        link.click()
    saved = Path(download_info.value.path())
    api_href = href.replace("/ui/jobs/", "/v1/fine_tuning/jobs/")
    assert saved.read_bytes() == fetched.body() == client.get(api_href).content
    assert not errors, errors


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_dashboard_cancel_isolation_and_sign_out(system: System, browser: Browser) -> None:
    url = system.stack.url
    client = system.team(name="ui-cancel")
    other = system.team(name="ui-other")
    # No worker serves this pool, so the job waits in the queue for the cancel button.
    system.stack.declare_pool("nobody-serves-this")
    job = system.submit(client, pool="nobody-serves-this")
    watched = system.submit(client, pool="nobody-serves-this")
    foreign = system.submit(other)
    page = browser.new_context().new_page()
    sign_in(page, url, client.key)

    # Another team's job is not there: the same 404 as a job that does not exist.
    assert page.goto(f"{url}/ui/jobs/{foreign['id']}").status == 404  # type: ignore[union-attr]
    assert page.request.get(f"{url}/ui/jobs/{foreign['id']}/data").status == 404
    assert page.goto(f"{url}/ui/jobs/ftjob-nonexistent").status == 404  # type: ignore[union-attr]

    # An open job page follows the job live: a cancel made elsewhere (the API) shows up by itself,
    # status from the page's polling and the event from its event stream.
    page.goto(f"{url}/ui/jobs/{watched['id']}")
    assert page.inner_text("#job-status") == "queued"
    assert client.post(f"/v1/fine_tuning/jobs/{watched['id']}/cancel").status_code == 200
    page.wait_for_selector("#job-status:has-text('cancelled')")
    page.wait_for_selector("ol.events li:has-text('Job cancelled')")
    assert page.locator("#cancel-form").count() == 0

    page.goto(f"{url}/ui/jobs/{job['id']}")
    assert page.inner_text("#job-status") == "queued"
    # A cancel without the form's token is refused (and changes nothing).
    forged = page.request.post(f"{url}/ui/jobs/{job['id']}/cancel", form={"csrf": "forged"})
    assert forged.status == 403
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"
    page.on("dialog", lambda dialog: dialog.accept())
    # Pause holds the queued job; Resume puts it back.
    page.click("#pause-form button")
    page.wait_for_selector("#job-status:has-text('paused')")
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "paused"
    page.click("#resume-form button")
    page.wait_for_selector("#job-status:has-text('queued')")
    assert page.locator("#pause-form").count() == 1
    page.click("#cancel-form button")
    page.wait_for_selector("#job-status:has-text('cancelled')")
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
    assert page.locator("#cancel-form").count() == 0
    page.screenshot(path=str(SHOTS / "cancelled.png"), full_page=True)

    # The Pool page: a node's slots (the team's job linked, another team's, a free one), its share
    # bar, and why its queued job waits. The node and the running jobs are what a worker would write.
    pool = system.stack.declare_pool("ui-pool")
    with system.stack.db.session() as session:
        # Its heartbeat ahead of the clock: live for the whole test, whatever the (6 s) test lease.
        now = time.time()
        worker = Worker(id="ui-node-1", pool=pool, hostname="ui-node", gpu_name="H100", slots=4,
                        free_slots=1, started_at=now, last_heartbeat_at=now + 600)  # fmt: skip
        session.add(worker)
        session.commit()
    mine, theirs, waiting = (
        system.submit(client, pool=pool),
        system.submit(other, pool=pool),
        system.submit(client, pool=pool),
    )
    set_job(system.stack, mine["id"], status="running", worker_id="ui-node-1", gpus=2)
    set_job(system.stack, theirs["id"], status="running", worker_id="ui-node-1")
    set_job(system.stack, waiting["id"], queue_reason="waiting for 1 free GPU")
    page.click("header nav a[href='/ui/pool']")
    page.wait_for_url(f"{url}/ui/pool")
    node = page.locator("tr.node[data-node-id='ui-node-1']")
    assert [node.locator(f".slot-{kind}").count() for kind in ("own", "other", "free")] == [2, 1, 1]
    assert node.locator(f"a.slot-own[href='/ui/jobs/{mine['id']}']").count() == 2
    assert (
        page.locator(f"tr.queued-job[data-job-id='{waiting['id']}'] .reason").inner_text()
        == "waiting for 1 free GPU"
    )
    bar = page.locator(f"section[data-pool='{pool}'] .share-row .bar-share")
    assert bar.evaluate("e => e.style.width").startswith("66.6")  # 2 of the 3 GPUs running
    assert theirs["id"] not in page.content() and other.name not in page.content()
    page.screenshot(path=str(SHOTS / "pool.png"), full_page=True)

    # Signing out drops the cookie: the pages ask for the key again.
    page.click("header form button")
    page.wait_for_url("**/ui/login")
    page.goto(f"{url}/ui/jobs/{job['id']}")
    assert "/ui/login" in page.url
    # The cookie never reaches the REST API (its path is /ui), and the REST API ignores cookies.
    assert httpx.get(f"{url}/v1/fine_tuning/jobs", cookies={"tunepool_key": client.key}).status_code == 401
