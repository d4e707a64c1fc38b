"""The one Settings class: read by API, worker and CLI alike (env prefix TUNEPOOL_).

Nothing else in tunepool reads os.environ. The defaults run on one machine with nothing but
Python: a SQLite database and a SQLite-backed Celery transport under ./.tunepool/, and artifacts
in ./.tunepool/artifacts. Production points TUNEPOOL_DATABASE_URL at PostgreSQL and
TUNEPOOL_BROKER_URL at Redis.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path(".tunepool")


class SettingsError(ValueError):
    """Settings that cannot work; the message names each TUNEPOOL_ variable at fault."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEPOOL_", extra="ignore")

    # Where the embedded defaults live (database, broker, artifacts) when not set explicitly.
    home: Path = DEFAULT_HOME
    # SQLAlchemy URL: sqlite:///path (one machine) or postgresql+psycopg://user@host/db.
    database_url: str = ""
    # Celery broker: sqla+sqlite:///path (embedded) or redis://host:6379/0.
    broker_url: str = ""
    # Artifact storage shared by API and workers: uploads, checkpoints, results.
    storage_dir: Path | None = None
    # Largest accepted upload, in bytes (413 above it).
    max_upload_bytes: int = Field(1024**3, ge=1024)
    # Largest body of any other request (job creation, webhooks, admin...), in bytes (413 above it).
    max_request_body_bytes: int = Field(1024**2, ge=1024)
    # Longest accepted JSONL line of an upload, in bytes.
    max_line_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Bad lines listed in an upload's 400 error (all are counted).
    max_reported_errors: int = Field(50, ge=1, le=10_000)
    # Where `tunepool api` listens.
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    # Pool a job goes to when its request names none.
    default_pool: str = "default"
    # Seconds the API waits for the broker when sending a dispatch message.
    broker_timeout_s: float = Field(2.0, gt=0)
    # Quotas of a new team (changed per team with `tunepool admin set-quota`).
    default_max_running_jobs: int = Field(2, ge=0)
    default_max_queued_jobs: int = Field(100, ge=0)
    default_max_storage_bytes: int = Field(50 * 1024**3, ge=0)
    # Connections per database pool (the API has a sync and an async pool of this size, plus as many
    # overflow connections each).
    db_pool_size: int = Field(10, ge=1)
    # Seconds a verified API key is remembered by an API process. A key revoked elsewhere (CLI,
    # another replica) stops working within this time; 0 checks the database on every request.
    auth_cache_seconds: float = Field(5.0, ge=0, le=300)
    # Failed authentications (a wrong, revoked or malformed key) one client address may make per
    # auth_failure_window_s before its further bad keys answer 429 (service/ratelimit.py); its valid
    # keys keep working. Counted per API process; 0 turns the limit off.
    auth_failure_limit: int = Field(20, ge=0)
    auth_failure_window_s: float = Field(60.0, gt=0)

    # --- workers (worker/): leases, heartbeats, recovery
    # A running job's lease: a worker that has not renewed it for this long is presumed dead, and
    # the job goes back to the queue (it resumes from its last checkpoint on another worker).
    lease_s: float = Field(60.0, ge=2)
    # How often a worker renews its job's lease and publishes progress (well under lease_s).
    heartbeat_s: float = Field(5.0, gt=0)
    # How often a worker moves new metrics, events and checkpoints into the database.
    poll_s: float = Field(0.5, gt=0)
    # Seconds a running job may take to stop after a cancel before it is killed.
    cancel_grace_s: float = Field(60.0, ge=0)
    # Attempts (a lost lease counts as one) before a job fails with `worker_lost`.
    max_attempts: int = Field(3, ge=1)
    # How often the reconciler runs, and how long a queued job waits before its dispatch
    # message is sent again (the broker lost it, or the API died between commit and send).
    reconcile_every_s: float = Field(5.0, gt=0)
    redispatch_after_s: float = Field(30.0, gt=0)
    # Checkpoint every this many steps when a job does not say (a crash loses at most this many).
    default_checkpoint_every: int = Field(50, ge=1)
    # Checkpoints kept per job (older ones are deleted from storage as newer ones complete).
    keep_checkpoints: int = Field(3, ge=1)
    # Fair share (worker/scheduling.py): a team's GPU-seconds used in a pool count half after this
    # long, a quarter after twice as long..., when teams equally served now are ordered.
    fairshare_half_life_s: float = Field(86400.0, gt=0)
    # Preemption (worker/scheduling.py `preemptions`): a team below its weighted share whose job has
    # waited preempt_after_s reclaims GPUs from the team furthest above its share (fairshare_preempt;
    # a team below its guaranteed_gpus reclaims whatever it does); no job is preempted before it has
    # run preempt_min_runtime_s. A preempted or paused job checkpoints its current step first, and
    # is killed if that takes longer than stop_grace_s (it then resumes from its last checkpoint).
    fairshare_preempt: bool = True
    preempt_after_s: float = Field(300.0, ge=0)
    preempt_min_runtime_s: float = Field(600.0, ge=0)
    stop_grace_s: float = Field(600.0, ge=0)
    # Address-space limit (RLIMIT_AS) of a training process in bytes, on CPU workers only (0: none).
    # A job that exceeds it fails with `out_of_memory` instead of taking the node's memory from
    # everything else. GPU workers (--gpu) ignore it, with a warning at start: CUDA reserves far
    # more address space than it uses, and breaks under any limit small enough to protect the host.
    job_memory_limit_bytes: int = Field(0, ge=0)

    # --- webhooks (service/webhooks.py): delivered by every worker's maintenance thread
    # Seconds one delivery POST may take.
    webhook_timeout_s: float = Field(5.0, gt=0)
    # Retry backoff: base * 2**(attempt - 1) seconds after a failed attempt, capped at max.
    webhook_backoff_base_s: float = Field(1.0, gt=0)
    webhook_backoff_max_s: float = Field(3600.0, gt=0)
    # Attempts before a delivery is given up as `failed`.
    webhook_max_attempts: int = Field(8, ge=1)

    # --- model registry and pools (service/teams.py, service/pools.py)
    # Directories under which admins may register base models (a model directory or a .gguf file),
    # separated by ':' or ','; symlinks must resolve inside them too. Empty: <home>/models only.
    model_roots: str = ""

    # --- webhook delivery, targets and secrets (service/webhook_delivery.py, netguard.py, secretbox.py)
    # Deliveries one worker sends at once (on its delivery thread), and at most this many for one team.
    webhook_concurrency: int = Field(32, ge=1, le=1000)
    webhook_team_concurrency: int = Field(8, ge=1, le=1000)
    # Webhook endpoints one team may register (409 webhook_endpoint_limit above it).
    webhook_max_endpoints: int = Field(16, ge=1)
    # CIDRs (comma-separated) webhooks may reach although they are loopback, private, link-local or
    # otherwise not global, e.g. "10.20.0.0/16,127.0.0.0/8"; empty: public addresses only.
    webhook_allow_cidrs: str = ""
    # How long the secret a rotation replaced still signs deliveries (beside the new one), seconds.
    webhook_secret_grace_s: float = Field(86400.0, ge=0)
    # Delivered and failed delivery rows are deleted this many seconds after they were created.
    webhook_retention_s: float = Field(30 * 86400.0, gt=0)
    # Fernet key(s) that encrypt webhook secrets at rest, comma-separated (the first encrypts, all
    # decrypt). The same on the API and every worker. Empty: <home>/secret.key, created once.
    secret_key: str = Field("", repr=False)

    # --- outages and scrape access (service/db.py, service/outages.py, service/metrics.py)
    # Seconds a statement waits on the database itself: SQLite's busy wait for another writer's lock,
    # and the connect timeout of PostgreSQL. Past it the request answers 503 (database_busy or
    # database_unavailable) with Retry-After; keep it well below what clients wait for an answer.
    db_timeout_s: float = Field(5.0, gt=0, le=120)
    # Seconds a request waits for a free pooled connection before it answers 503 database_busy.
    db_acquire_timeout_s: float = Field(10.0, gt=0, le=300)
    # Bearer token GET /metrics requires when set. Unset, /metrics answers anyone who can reach the
    # API's port, and its series name every team.
    metrics_token: str = Field("", repr=False)

    # --- full or read-only storage under workers (worker/artifacts.py, worker/storage_space.py)
    # A worker claims no job while the artifact storage (its root or jobs/) has fewer bytes free than
    # this, or is read-only: a job stopped by a full disk waits, queued, until space is freed.
    min_free_bytes: int = Field(1024**3, ge=0)
    # Files in the storage's tmp/ untouched for this many seconds (left by a killed upload or results
    # write) are deleted by the reconciler; keep it above the longest upload.
    tmp_max_age_s: float = Field(86400.0, gt=0)

    # --- slow clients: per-connection limits (service/http_protocol.py) and per-team caps
    # Seconds a connection may take to send a request's line and headers, from its opening or from
    # the first byte after the previous response (408 and closed past it; an idle new socket is closed).
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    # Seconds a request body may go without a byte arriving (408 and closed past it).
    body_idle_timeout_s: float = Field(30.0, gt=0, le=3600)
    # Seconds an idle keep-alive connection stays open after a response (uvicorn's timeout_keep_alive).
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=600)
    # Seconds a client may leave a response unread (its socket buffers full) before it is disconnected.
    send_stall_timeout_s: float = Field(60.0, gt=0, le=3600)
    # Open connections plus running requests of one API process past which requests answer 503
    # (uvicorn's limit_concurrency).
    max_connections: int = Field(2048, ge=1)
    # Concurrent uploads, downloads (file and checkpoint content) and event streams one team may have
    # open in one API process; past them, 429 with Retry-After (service/team_limits.py).
    team_max_uploads: int = Field(8, ge=1)
    team_max_downloads: int = Field(16, ge=1)
    team_max_event_streams: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check_webhook_settings(self) -> Settings:
        from service.netguard import parse_allow_cidrs
        from service.secretbox import parse_keys

        parse_allow_cidrs(self.webhook_allow_cidrs)  # a ValueError that names the variable
        parse_keys(self.secret_key)
        return self

    @model_validator(mode="after")
    def _fill_and_check(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'tunepool.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        if self.storage_dir is None:
            self.storage_dir = self.home / "artifacts"
        problems = []
        if not self.database_url.startswith(("sqlite:", "postgresql")):
            problems.append(
                f"TUNEPOOL_DATABASE_URL: expected sqlite:///... or postgresql+psycopg://..., got "
                f"{self.database_url.split(':', 1)[0]}:..."
            )
        if self.database_url.startswith("postgresql://"):
            self.database_url = "postgresql+psycopg://" + self.database_url.removeprefix("postgresql://")
        if not self.broker_url.startswith(("sqla+sqlite:", "redis:", "rediss:", "amqp:", "memory:")):
            problems.append("TUNEPOOL_BROKER_URL: expected sqla+sqlite:///..., redis://... or amqp://...")
        if self.heartbeat_s * 2 > self.lease_s:
            problems.append("TUNEPOOL_HEARTBEAT_S: must be at most half of TUNEPOOL_LEASE_S")
        if self.max_line_bytes > self.max_upload_bytes:
            problems.append("TUNEPOOL_MAX_LINE_BYTES: larger than TUNEPOOL_MAX_UPLOAD_BYTES")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def artifacts(self) -> Path:
        assert self.storage_dir is not None
        return self.storage_dir

    @property
    def model_root_paths(self) -> list[Path]:
        roots = [p for p in re.split(r"[:,]", self.model_roots) if p.strip()]
        return [Path(p.strip()).expanduser() for p in roots] or [self.home / "models"]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and overrides); SettingsError with every bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"])
            name = f"TUNEPOOL_{loc.upper()}" if loc else ""
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"{name}: {message}" if name else message)
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
