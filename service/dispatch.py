"""Dispatch messages: the API tells a pool "a job may be waiting" through Celery, by task name.

The message names a pool, not a job: the worker that receives it claims the next job from the
database itself (issue #4). So a lost message only delays work (the reconciler re-sends), and a
surplus one is a no-op. The API never imports worker code: it sends by name.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from typing import Any

from service.settings import Settings

log = logging.getLogger("tunepool.dispatch")

DISPATCH_TASK = "tunepool.dispatch"


def queue_name(pool: str) -> str:
    return f"pool.{pool}"


def transport_options(broker_url: str, timeout_s: float) -> dict[str, Any]:
    """Fail fast instead of retrying forever when the broker is down (Redis needs socket timeouts)."""
    if broker_url.startswith(("redis:", "rediss:")):
        return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "max_retries": 0}
    return {"max_retries": 0}


@lru_cache(maxsize=4)
def _celery(broker_url: str, timeout_s: float) -> Any:
    from celery import Celery

    app = Celery("tunepool-api", broker=broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry=False,
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=timeout_s,
        broker_transport_options=transport_options(broker_url, timeout_s),
    )
    return app


def send_dispatch(settings: Settings, pool: str) -> bool:
    """Send one dispatch message to the pool's queue; False (logged) if the broker is unreachable.

    Runs the send in a thread bounded by broker_timeout_s, so a dead broker never hangs a request.
    """
    outcome: dict[str, bool] = {}

    def send() -> None:
        try:
            app = _celery(settings.broker_url, settings.broker_timeout_s)
            app.send_task(
                DISPATCH_TASK,
                args=[pool],
                queue=queue_name(pool),
                retry=False,
                kwargs={"sent_at": time.time()},
            )
            outcome["ok"] = True
        except Exception as err:  # the broker is down or refuses: the job waits in the database
            log.warning("dispatch to %s failed: %s", queue_name(pool), err)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    thread.join(settings.broker_timeout_s + 1.0)
    return outcome.get("ok", False)
