"""The pool's policy: who goes next, what is reserved, whom to preempt, and why a job waits. Pure
functions over a snapshot of one pool.

`worker/claim.py` reads a `Snapshot` inside its transaction and asks `rank` for the order in which
to try the queued jobs; the reconciler (worker/reconciler.py) asks `preemptions` whom to stop and
`queue_reasons` what to tell the jobs that wait; bench/pool_sim.py drives the same functions over
a simulated cluster. Nothing here reads a clock: `now` is always given.

The order (design.md, "The pool"):

1. a team at one of its limits is skipped: `max_running_jobs` (jobs, over all pools) and
   `max_gpus` (GPUs, over all pools; none = no limit);
2. a job that does not fit the claiming node's free slots is skipped (all K slots on one node,
   or none);
3. then a team below its `guaranteed_gpus` in this pool, then the team with the fewest GPUs
   running now in this pool per unit of share weight;
4. then the team with the least decayed GPU-seconds used in this pool per unit of share weight:
   usage is K x running seconds, and it halves every `half_life_s` (a team that used the pool
   heavily yesterday goes after one that did not, and is forgiven in a few days); compared in
   whole GPU-minutes, so that a moment's difference is a tie;
5. then higher priority, then older (within a team, only its first job by priority and age is a
   candidate, so a team's own order is priority then age).

Big jobs are not starved (`reservations`): the first job in that order that fits no node now
reserves the node that can free its K slots soonest (from the running jobs' estimated finish);
that node then starts only jobs that fit in what it will have beyond those K slots, or preemptible
jobs as backfill, which the reserving job preempts as soon as the node's other jobs have ended (the
slots work meanwhile, and the big job is not delayed). A job that preempted others holds the slots
they free the same way.

Preemption (`preemptions`), one at a time per pool, never of a job that has run less than
`min_runtime_s` or is not preemptible:

- a team's higher-priority job may stop that team's own lower-priority jobs (at once); a
  priority never stops another team's job;
- after waiting `after_s`, a team below its `guaranteed_gpus` in the pool reclaims GPUs from teams
  above their own guarantee (leaving them at or above it);
- after waiting `after_s` (and with `fairshare` on), a team below its weighted share of the pool
  reclaims GPUs from the team furthest above its share, as long as the gap between the two teams'
  GPUs per weight shrinks (else the victim would preempt straight back: bench/pool_sim.py saw that
  thrash when only the victim's side was checked); where the gap stays the same (one slot, two
  teams), the team with more decayed usage per weight yields, so teams take turns that even out
  their GPU time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

# Share weights are positive; a zero weight would make every share infinite, not just large.
_MIN_WEIGHT = 1e-9
# Usage is compared in whole GPU-minutes per unit of weight: teams whose usage differs by less
# (two jobs claimed a moment apart, say) are equally served, and priority and age decide.
USAGE_QUANTUM_S = 60.0


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
    guaranteed_gpus: int = 0  # in this pool

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
    queued_at: float | None = None  # when it last joined the queue
    reserved_node: str | None = None  # the node whose jobs it preempted: their slots are its own
    preemptible: bool = True


@dataclass(frozen=True)
class Running:
    """A job running in the pool, on one node."""

    job_id: str
    team_id: str
    gpus: int
    node: str | None
    priority: int = 0
    preemptible: bool = True
    started_at: float | None = None  # this attempt's start
    finish_at: float | None = None  # estimated; None: not known yet
    stop: str | None = None  # a stop asked of it: cancel, pause, preempt
    backfill_for: str | None = None  # the job whose reserved slots it took (which preempts it)


@dataclass(frozen=True)
class Snapshot:
    """One pool at one moment: its teams, their first queued jobs, its nodes and running jobs, and
    the claiming node."""

    teams: dict[str, TeamState]
    candidates: list[Candidate]
    free_slots: int  # on the node that is claiming
    skip: frozenset[str] = field(default_factory=frozenset)  # job ids already tried this round
    node: str | None = None  # the claiming node (None: no node is claiming)
    nodes: dict[str, int] = field(default_factory=dict)  # live nodes of the pool: id -> slots
    running: list[Running] = field(default_factory=list)  # the pool's running jobs
    now: float = 0.0
    pool: str = ""

    def free_on(self, node: str) -> int:
        """Free slots of a node: the claiming node says its own; others are counted from the jobs."""
        if node == self.node:
            return self.free_slots
        return self.nodes.get(node, 0) - sum(r.gpus for r in self.running if r.node == node)


@dataclass(frozen=True)
class Reservation:
    job: Candidate
    node: str
    start_at: float  # when the node is expected to have the job's slots free (inf: not known)
    surplus: int  # slots the node will have free then beyond the job's: what other jobs may take
    backfill: bool = True  # preemptible jobs may take the rest meanwhile (not on a preemption's hold)


@dataclass(frozen=True)
class PreemptPolicy:
    fairshare: bool = True  # TUNEPOOL_FAIRSHARE_PREEMPT
    after_s: float = 300.0  # TUNEPOOL_PREEMPT_AFTER_S: a job waits this long before it preempts
    min_runtime_s: float = 600.0  # TUNEPOOL_PREEMPT_MIN_RUNTIME_S


@dataclass(frozen=True)
class Preemption:
    job: Candidate  # the job the slots are for
    node: str
    victims: tuple[Running, ...]
    reason: str  # why, for the victims' events


def limit_reason(team: TeamState, gpus: int) -> str | None:
    """Why `team` may not start a job of `gpus` GPUs now (a limit it is at), or None."""
    if team.running_jobs >= team.max_running_jobs:
        return f"team at max_running_jobs ({team.running_jobs} of {team.max_running_jobs})"
    if team.max_gpus is not None and team.gpus_running + gpus > team.max_gpus:
        return f"team at max_gpus ({team.gpus_running} of {team.max_gpus} running, {gpus} asked)"
    return None


def sort_key(team: TeamState, job: Candidate) -> tuple[int, float, int, int, int]:
    """Smaller goes first: a team below its guaranteed GPUs in the pool, then GPUs running per
    weight, decayed usage per weight (GPU-minutes), priority, age."""
    usage = math.floor(team.usage / team.weight / USAGE_QUANTUM_S)
    guaranteed = 0 if team.gpus_in_pool < team.guaranteed_gpus else 1
    return (guaranteed, team.gpus_in_pool / team.weight, usage, -job.priority, job.pk)


def in_line(snapshot: Snapshot) -> list[Candidate]:
    """The candidates whose teams are within their limits, in the order they go, fit aside: a job
    that preempted others first (the slots are its own), then `sort_key`."""
    eligible = []
    for job in snapshot.candidates:
        team = snapshot.teams.get(job.team_id)
        if team is None or limit_reason(team, job.gpus) is not None:
            continue
        held = job.reserved_node is not None and job.reserved_node in snapshot.nodes
        eligible.append(((0 if held else 1, *sort_key(team, job)), job))
    eligible.sort(key=lambda pair: pair[0])
    return [job for _, job in eligible]


def _freeing(snapshot: Snapshot, node: str, gpus: int, job_id: str) -> tuple[float, int]:
    """When `node` is expected to have `gpus` slots free for `job_id` (now, a running job's estimated
    finish, or inf when that is not known), and how many it will have free then. Jobs stopping, and
    jobs backfilled on its reservation (it preempts them), free theirs at once."""
    free = snapshot.free_on(node)

    def end_of(r: Running) -> float:
        if r.stop or r.backfill_for == job_id:
            return snapshot.now
        return r.finish_at if r.finish_at is not None else math.inf

    ends = sorted((end_of(r), r.gpus) for r in snapshot.running if r.node == node)
    if free >= gpus:
        return snapshot.now, free
    total = free
    for end, g in ends:
        total += g
        if total >= gpus:
            if math.isinf(end):
                break
            return end, free + sum(g for e, g in ends if e <= end)  # with every job ending by then
    return math.inf, free  # not known when: nothing may count on the slots beyond


def reservations(snapshot: Snapshot) -> dict[str, Reservation]:
    """Node -> the reservation it holds: each job that preempted others holds its node; then the
    first job in line that fits no node now (and can run on one) holds the node that frees its slots
    soonest, if no reservation holds that node already."""
    held: dict[str, Reservation] = {}
    line = in_line(snapshot)
    for job in line:
        node = job.reserved_node
        if node is not None and node in snapshot.nodes and node not in held:
            at, free = _freeing(snapshot, node, job.gpus, job.job_id)
            held[node] = Reservation(job, node, at, max(free - job.gpus, 0), backfill=False)
    waiting = [j for j in line if j.reserved_node is None or j.reserved_node not in snapshot.nodes]
    largest = max(snapshot.nodes.values(), default=0)
    first = next((j for j in waiting if j.gpus <= largest), None)
    if first is None or any(snapshot.free_on(n) >= first.gpus for n in snapshot.nodes):
        return held
    options = []
    for node, slots in snapshot.nodes.items():
        if slots >= first.gpus and node not in held:
            at, free = _freeing(snapshot, node, first.gpus, first.job_id)
            options.append((at, -snapshot.free_on(node), node, free))
    if options:
        at, _, node, free = min(options)
        held[node] = Reservation(first, node, at, max(free - first.gpus, 0))
    return held


def rank(snapshot: Snapshot) -> list[Candidate]:
    """The candidates the claiming node may start, in the order to try them: those that fit its free
    slots; on a node another job has reserved, that job, jobs that fit in the surplus, and
    preemptible jobs as backfill (`backfill_for`: the reserving job preempts them when its slots are
    due, so the slots work meanwhile and it is not delayed)."""
    reserved = reservations(snapshot).get(snapshot.node) if snapshot.node is not None else None
    order = []
    for job in in_line(snapshot):
        if job.job_id in snapshot.skip or job.gpus > snapshot.free_slots:
            continue
        if job.reserved_node in snapshot.nodes and job.reserved_node != snapshot.node:
            continue  # the slots its preemption frees are elsewhere
        taken = backfill_for(snapshot, job, reserved) is not None
        # No backfill once the reserved slots are due (its backfill is about to make way for it).
        open_to_backfill = reserved is not None and reserved.backfill and reserved.start_at > snapshot.now
        if taken and not (job.preemptible and open_to_backfill):
            continue
        order.append(job)
    return order


def backfill_for(snapshot: Snapshot, job: Candidate, reserved: Reservation | None = None) -> str | None:
    """The reserving job whose slots `job` takes if the claiming node starts it, or None."""
    if reserved is None and snapshot.node is not None:
        reserved = reservations(snapshot).get(snapshot.node)
    if reserved is None or job.job_id == reserved.job.job_id or job.gpus <= reserved.surplus:
        return None
    return reserved.job.job_id


# ---------------------------------------------------------------------------------------------------
# Why a job waits


def queue_reasons(snapshot: Snapshot, queued: list[Candidate]) -> dict[str, str]:
    """For every queued job of the pool (`queued`: all of them, not only the candidates), why it
    has not started, in words a user can act on."""
    pool = snapshot.pool or "this pool"
    line = in_line(snapshot)
    place = {job.job_id: i for i, job in enumerate(line)}
    held = reservations(snapshot)
    holds = {r.job.job_id: r for r in held.values()}
    largest = max(snapshot.nodes.values(), default=0)
    most_free = max((snapshot.free_on(n) for n in snapshot.nodes), default=0)
    first_of_team = {c.team_id: c.job_id for c in snapshot.candidates}
    team_order = sorted(queued, key=lambda j: (j.team_id, -j.priority, j.pk))
    before_in_team: dict[str, int] = {}
    seen: dict[str, int] = {}
    for job in team_order:
        before_in_team[job.job_id] = seen.get(job.team_id, 0)
        seen[job.team_id] = before_in_team[job.job_id] + 1
    reasons = {}
    for job in queued:
        k = job.gpus
        team = snapshot.teams.get(job.team_id)
        gpus = f"{k} GPU{'s' if k > 1 else ''}"
        if not snapshot.nodes:
            reason = f"no worker of pool {pool} is running"
        elif k > largest:
            reason = f"no worker in pool {pool} has {k} slots (the largest has {largest})"
        elif first_of_team.get(job.team_id) != job.job_id:
            n = before_in_team[job.job_id]
            jobs = "1 earlier job of your team goes" if n == 1 else f"{n} earlier jobs of your team go"
            reason = f"{jobs} first (priority, then age)"
        elif team is not None and (limit := limit_reason(team, k)) is not None:
            reason = limit
        elif job.job_id in holds:
            hold = holds[job.job_id]
            when = "as the jobs it preempted stop" if job.reserved_node else "as its running jobs end"
            reason = (
                f"first in line: waiting for {gpus} on one node of pool {pool} (most free on a node: "
                f"{most_free}); worker {hold.node} is reserved for it and frees them {when}"
            )
        else:
            ahead = place.get(job.job_id, 0)
            fits = [n for n in snapshot.nodes if snapshot.free_on(n) >= k]
            open_nodes = [
                n for n in fits
                if n not in held or held[n].surplus >= k or (held[n].backfill and job.preemptible)
            ]  # fmt: skip
            if not fits:
                reason = f"waiting for {gpus} on one node of pool {pool} (most free on a node: {most_free})"
            elif not open_nodes:
                hold = held[fits[0]]
                reason = f"GPUs reserved for {hold.job.job_id} (needs {hold.job.gpus})"
            else:
                reason = "next in line: it starts at the pool's next claim"
            if ahead:
                reason += (
                    f"; {ahead} job{'s' if ahead > 1 else ''} of teams with fewer GPUs running or less "
                    "recent usage go first"
                )
        reasons[job.job_id] = reason
    return reasons


# ---------------------------------------------------------------------------------------------------
# Preemption


def fair_shares(snapshot: Snapshot) -> dict[str, float]:
    """Each active team's share of the pool's GPUs (its weight over the active teams' weights):
    teams running or waiting in the pool."""
    total = sum(snapshot.nodes.values())
    active = {r.team_id for r in snapshot.running} | {c.team_id for c in snapshot.candidates}
    teams = [snapshot.teams[t] for t in active if t in snapshot.teams]
    weights = sum(t.weight for t in teams)
    return {t.id: total * t.weight / weights for t in teams} if weights else {}


def _pick(
    snapshot: Snapshot, job: Candidate, allowed: list[Running], fine: Callable[[list[Running]], bool]
) -> tuple[str, list[Running]] | None:
    """The node and the fewest GPUs of `allowed` running jobs to stop there so that `job` fits;
    `fine(victims)` says whether a set is acceptable to the victims' teams."""
    best: tuple[tuple[int, int], str, list[Running]] | None = None
    for node, slots in snapshot.nodes.items():
        if slots < job.gpus:
            continue
        need = job.gpus - snapshot.free_on(node)
        if need <= 0:
            return None  # it fits now: nothing to preempt
        chosen: list[Running] = []
        for victim in sorted(
            (r for r in allowed if r.node == node), key=lambda r: (r.priority, -(r.started_at or 0.0))
        ):
            if need <= 0:
                break
            if fine([*chosen, victim]):
                chosen.append(victim)
                need -= victim.gpus
        if need <= 0:
            cost = (sum(v.gpus for v in chosen), len(chosen))
            if best is None or cost < best[0]:
                best = (cost, node, chosen)
    return None if best is None else (best[1], best[2])


def preemptions(snapshot: Snapshot, policy: PreemptPolicy) -> list[Preemption]:
    """The preemption the pool needs now, if any (one at a time: none while one is under way)."""
    if any(r.stop == "preempt" for r in snapshot.running):
        return []
    now = snapshot.now

    def may_stop(r: Running) -> bool:
        ran = now - r.started_at if r.started_at is not None else math.inf
        return r.preemptible and r.stop is None and ran >= policy.min_runtime_s

    # Backfill on a reservation whose slots are due (the other jobs there have ended): at once.
    for node, held in reservations(snapshot).items():
        holder = held.job.job_id
        due = [r for r in snapshot.running if r.node == node and r.backfill_for == holder and not r.stop]
        free = snapshot.free_on(node)
        if due and free < held.job.gpus <= free + sum(r.gpus for r in due):
            chosen = []
            for r in sorted(due, key=lambda r: -(r.started_at or 0.0)):  # the youngest first
                chosen.append(r)
                free += r.gpus
                if free >= held.job.gpus:
                    break
            reason = f"Preempted by {holder}: it ran on GPUs reserved for that job, which are now due"
            return [Preemption(held.job, node, tuple(chosen), reason)]
    stoppable = [r for r in snapshot.running if may_stop(r)]
    shares = fair_shares(snapshot)
    for job in in_line(snapshot):
        if any(snapshot.free_on(n) >= job.gpus for n in snapshot.nodes):
            continue  # it starts at the next claim
        team = snapshot.teams[job.team_id]
        # A team's own higher-priority job: at once.
        own = [r for r in stoppable if r.team_id == job.team_id and r.priority < job.priority]
        if (found := _pick(snapshot, job, own, lambda victims: True)) is not None:
            reason = f"Preempted by {job.job_id} (priority {job.priority}) of the same team"
            return [Preemption(job, found[0], tuple(found[1]), reason)]
        waited = now - job.queued_at if job.queued_at is not None else 0.0
        if waited < policy.after_s:
            continue
        mine = team.gpus_in_pool + job.gpus
        others = [r for r in stoppable if r.team_id != job.team_id]
        if team.guaranteed_gpus and mine <= team.guaranteed_gpus:

            def above_guarantee(victims: list[Running]) -> bool:
                lost: dict[str, int] = {}
                for v in victims:
                    lost[v.team_id] = lost.get(v.team_id, 0) + v.gpus
                teams = snapshot.teams
                return all(teams[t].gpus_in_pool - n >= teams[t].guaranteed_gpus for t, n in lost.items())

            if (found := _pick(snapshot, job, others, above_guarantee)) is not None:
                reason = (
                    f"Preempted by {job.job_id}: its team is below its guaranteed GPUs in pool "
                    f"{snapshot.pool} ({team.gpus_in_pool} of {team.guaranteed_gpus})"
                )
                return [Preemption(job, found[0], tuple(found[1]), reason)]
        share = shares.get(team.id, 0.0)
        if not policy.fairshare or team.gpus_in_pool >= share:
            continue
        above = sorted(
            (t for t in snapshot.teams.values() if t.id in shares and t.gpus_in_pool > shares[t.id]),
            key=lambda t: -(t.gpus_in_pool - shares[t.id]) / t.weight,
        )
        for victim_team in above:
            if victim_team.id == team.id:
                continue

            def no_inversion(
                victims: list[Running],
                v: TeamState = victim_team,
                claimant: TeamState = team,
                k: int = job.gpus,
            ) -> bool:
                # The gap between the two teams' GPUs per weight must shrink (else the victim would
                # preempt straight back); an equal gap (one slot, two teams) goes to the team that
                # used the pool less lately.
                before = abs(v.gpus_in_pool / v.weight - claimant.gpus_in_pool / claimant.weight)
                left = (v.gpus_in_pool - sum(x.gpus for x in victims)) / v.weight
                after = abs(left - (claimant.gpus_in_pool + k) / claimant.weight)
                if math.isclose(after, before):
                    return v.usage / v.weight > claimant.usage / claimant.weight + USAGE_QUANTUM_S
                return after < before

            pool = [r for r in others if r.team_id == victim_team.id]
            if (found := _pick(snapshot, job, pool, no_inversion)) is not None:
                reason = (
                    f"Preempted by {job.job_id} for fair share: its team ran {team.gpus_in_pool} GPUs "
                    f"of its share {share:.1f}, this one's {victim_team.gpus_in_pool} of "
                    f"{shares[victim_team.id]:.1f}"
                )
                return [Preemption(job, found[0], tuple(found[1]), reason)]
    return []
