"""`tunepool up`: the whole stack on one machine, as child processes of one command.

The API and one worker (which runs the reconciler too) are started as `tunepool api` and
`tunepool worker` would be, with the same settings. Output of both goes to this terminal,
prefixed by process. Ctrl-C (or SIGTERM) stops both: the worker hands a running job back to the
queue, and it resumes from its last checkpoint when the stack runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO

import httpx

from service.settings import Settings


def _pump(prefix: str, stream: IO[bytes]) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
        sys.stdout.flush()


def run_stack(settings: Settings, host: str, port: int, pool: str, gpu: int | None) -> int:
    cli = [sys.executable, "-m", "service.cli"]
    worker_args = ["worker", "--pool", pool] + ([] if gpu is None else ["--gpu", str(gpu)])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, args in (("api", ["api", "--host", host, "--port", str(port)]), ("worker", worker_args)):
        proc = subprocess.Popen(
            [*cli, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs[name] = proc
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(f"[{name}]", proc.stdout), daemon=True).start()

    stopping = threading.Event()

    def stop(*_: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.monotonic() + 60
    while not stopping.is_set() and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if any(p.poll() is not None for p in procs.values()):
            break
        time.sleep(0.3)
    if all(p.poll() is None for p in procs.values()) and not stopping.is_set():
        database, broker = (u.split("://", 1)[0] for u in (settings.database_url, settings.broker_url))
        print(
            f"\ntunepool is up: API {url} (docs {url}/docs, dashboard {url}/ui), one worker on pool "
            f"{pool!r}, database {database}, broker {broker}\n"
            "create a team and its API key:  tunepool admin create-team NAME   (the key is the last line)\n"
            "register a base model:         tunepool admin add-model NAME SOURCE\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
    code = 0
    while not stopping.is_set():
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"[{name}] exited with status {proc.returncode}; stopping", flush=True)
                code = 1
                stopping.set()
        stopping.wait(0.5)
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return code
