"""`tunepool up`: the whole stack from one command on the embedded defaults, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from sqlalchemy import select

from service.db import Database
from service.models import Worker
from service.settings import load_settings
from tests.service.conftest import ROOT, free_port


def test_up_runs_api_and_worker_on_embedded_defaults_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPOOL_")}
    env |= {"PYTHONPATH": str(ROOT), "TUNEPOOL_HOME": str(tmp_path / "home")}
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "tunepool is up" not in log.read_text():
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        text = log.read_text()
        assert f"API http://127.0.0.1:{port}" in text and "tunepool admin create-team" in text
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        db = Database(load_settings(home=tmp_path / "home"))

        def workers() -> list[str]:
            with db.session() as session:
                return list(session.scalars(select(Worker.id)))

        while not workers():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 2  # the API and the worker
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text():  # Celery's signal handlers are installed
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        # Everything under TUNEPOOL_HOME: the SQLite database and the SQLite broker.
        assert (tmp_path / "home" / "tunepool.db").exists() and (tmp_path / "home" / "broker.db").exists()

        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(120) == 0, log.read_text()[-3000:]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, alive
        assert workers() == []  # the worker unregistered
        db.dispose()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
