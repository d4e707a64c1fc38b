"""The Celery app of the workers and its one task, `tunepool.dispatch`.

Celery carries dispatch and nothing else. A message names a pool ("a job may be waiting"); the
worker that gets it claims jobs from the database itself (worker/claim.py) until none is left
for it, so the order is decided when a GPU frees, and a redelivered or surplus message is a
no-op. The database lease, not the broker, decides who runs a job: late acks and redelivery on a
lost worker only make sure some worker looks at the pool again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from service.dispatch import DISPATCH_TASK, queue_name, transport_options
from service.settings import Settings

# A job may run for days: a message the broker re-delivers after this long only makes another
# worker look for work (and find none, or the next job); it never runs a job twice.
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def make_celery(settings: Settings, drain: Callable[[str], int] | None = None) -> Celery:
    """The app; `drain(pool)` is what the dispatch task runs (the worker's own, given by
    worker/process.py: this module imports nothing of the worker). Without it, the app can send
    dispatch messages but its task refuses to run."""
    app = Celery("tunepool", broker=settings.broker_url, set_as_current=True)
    options: dict[str, Any] = {}
    if not settings.broker_url.startswith("sqla+"):  # the SQLite transport hands these to create_engine
        options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
        options |= {
            k: v for k, v in transport_options(settings.broker_url, 10.0).items() if k != "max_retries"
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # pickle refused
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue_name(settings.default_pool),
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )

    @app.task(name=DISPATCH_TASK, ignore_result=True)
    def dispatch(pool: str, sent_at: float | None = None) -> int:
        """Claim and run the pool's jobs until none is left for this worker; how many ran."""
        if drain is None:
            raise RuntimeError("no tunepool worker in this process (start one with `tunepool worker`)")
        return drain(pool)

    return app
