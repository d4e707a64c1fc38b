"""The pool's policy: who goes next, and why a job waits. Pure functions over a snapshot.

`worker/claim.py` reads a `Snapshot` of one pool from the database inside its transaction and
asks `rank` for the order in which to try the queued jobs; the same functions serve anything that
needs to reason about the pool without a database (tests, simulations). Nothing here reads a
clock: `now` is always given.

The order (design.md, "The pool"):

1. a team at one of its limits is skipped: `max_running_jobs` (jobs, over all pools) and
   `max_gpus` (GPUs, over all pools; none = no limit);
2. a job that does not fit the claiming node's free slots is skipped (all K slots on one node,
   or none);
3. then the team with the fewest GPUs running now in this pool per unit of share weight;
4. then the team with the least decayed GPU-seconds used in this pool per unit of share weight:
   usage is K x running seconds, and it halves every `half_life_s` (a team that used the pool
   heavily yesterday goes after one that did not, and is forgiven in a few days); compared in
   whole GPU-minutes, so that a moment's difference is a tie;
5. then higher priority, then older (within a team, only its first job by priority and age is a
   candidate, so a team's own order is priority then age).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Share weights are positive; a zero weight would make every share infinite, not just large.
_MIN_WEIGHT = 1e-9
# Usage is compared in whole GPU-minutes per unit of weight: teams whose usage differs by less
# (two jobs claimed a moment apart, say) are equally served, and priority and age decide.
USAGE_QUANTUM_S = 60.0


def decayed(value: float, as_of: float, now: float, half_life_s: float) -> float:
    """`value` (GPU-seconds as of `as_of`) seen at `now`: halved for every `half_life_s` since."""
    if value == 0.0 or now <= as_of:
        return value
    return value * math.pow(0.5, (now - as_of) / half_life_s)


def add_usage(value: float, as_of: float, now: float, half_life_s: float, gpu_seconds: float) -> float:
    """The decayed total as of `now` after adding `gpu_seconds` used just now."""
    return decayed(value, as_of, now, half_life_s) + gpu_seconds


@dataclass(frozen=True)
class TeamState:
    """One team as the claim sees it."""

    id: str
    share_weight: float
    max_running_jobs: int
    max_gpus: int | None
    running_jobs: int = 0  # in every pool
    gpus_running: int = 0  # in every pool
    gpus_in_pool: int = 0  # in this pool
    usage: float = 0.0  # decayed GPU-seconds in this pool, now (running jobs included)

    @property
    def weight(self) -> float:
        return max(self.share_weight, _MIN_WEIGHT)


@dataclass(frozen=True)
class Candidate:
    """A queued job that may go next: its team's first by priority, then age."""

    team_id: str
    job_id: str
    gpus: int
    priority: int
    pk: int  # creation order


@dataclass(frozen=True)
class Snapshot:
    """One pool at one moment: its teams, their first queued jobs, and the claiming node."""

    teams: dict[str, TeamState]
    candidates: list[Candidate]
    free_slots: int  # on the node that is claiming
    skip: frozenset[str] = field(default_factory=frozenset)  # job ids already tried this round


def limit_reason(team: TeamState, gpus: int) -> str | None:
    """Why `team` may not start a job of `gpus` GPUs now (a limit it is at), or None."""
    if team.running_jobs >= team.max_running_jobs:
        return f"team at max_running_jobs ({team.running_jobs} of {team.max_running_jobs})"
    if team.max_gpus is not None and team.gpus_running + gpus > team.max_gpus:
        return f"team at max_gpus ({team.gpus_running} of {team.max_gpus} running, {gpus} asked)"
    return None


def sort_key(team: TeamState, job: Candidate) -> tuple[float, int, int, int]:
    """Smaller goes first: GPUs running per weight, decayed usage per weight (GPU-minutes),
    priority, age."""
    usage = math.floor(team.usage / team.weight / USAGE_QUANTUM_S)
    return (team.gpus_in_pool / team.weight, usage, -job.priority, job.pk)


def rank(snapshot: Snapshot) -> list[Candidate]:
    """The candidates this node may start, in the order to try them."""
    eligible = []
    for job in snapshot.candidates:
        team = snapshot.teams.get(job.team_id)
        if team is None or job.job_id in snapshot.skip or job.gpus > snapshot.free_slots:
            continue
        if limit_reason(team, job.gpus) is not None:
            continue
        eligible.append((sort_key(team, job), job))
    eligible.sort(key=lambda pair: pair[0])
    return [job for _, job in eligible]
