"""The pool's policy (worker/scheduling.py) as pure functions: decay, limits, fit, order, reservation
and backfill, why a job waits, and whom to preempt."""

from __future__ import annotations

import pytest

from service.usage import add_usage, decayed
from worker.scheduling import (
    Candidate,
    PreemptPolicy,
    Running,
    Snapshot,
    TeamState,
    backfill_for,
    limit_reason,
    preemptions,
    queue_reasons,
    rank,
    reservations,
)

DAY = 86400.0


def team(team_id: str, **fields: object) -> TeamState:
    values: dict[str, object] = {"share_weight": 1.0, "max_running_jobs": 100, "max_gpus": None, **fields}
    return TeamState(id=team_id, **values)  # type: ignore[arg-type]


def job(team_id: str, n: int, gpus: int = 1, priority: int = 0) -> Candidate:
    return Candidate(team_id=team_id, job_id=f"{team_id}{n}", gpus=gpus, priority=priority, pk=n)


def order(teams: list[TeamState], jobs: list[Candidate], free_slots: int = 8) -> list[str]:
    return [c.job_id for c in rank(Snapshot({t.id: t for t in teams}, jobs, free_slots))]


def test_usage_halves_every_half_life() -> None:
    assert decayed(100.0, as_of=0.0, now=DAY, half_life_s=DAY) == pytest.approx(50.0)
    assert decayed(100.0, as_of=0.0, now=3 * DAY, half_life_s=DAY) == pytest.approx(12.5)
    assert decayed(100.0, as_of=DAY, now=DAY, half_life_s=DAY) == 100.0
    assert decayed(100.0, as_of=DAY, now=0.0, half_life_s=DAY) == 100.0  # a clock step back decays nothing
    # 3600 GPU-seconds a day ago, plus 60 just now
    assert add_usage(3600.0, 0.0, DAY, DAY, 60.0) == pytest.approx(1860.0)


def test_fewest_gpus_running_per_weight_goes_first() -> None:
    a = team("a", gpus_in_pool=4)  # one 4-GPU job looks like four 1-GPU jobs, not one
    b = team("b", gpus_in_pool=3)
    assert order([a, b], [job("a", 1), job("b", 2)]) == ["b2", "a1"]
    heavy = team("a", gpus_in_pool=4, share_weight=3.0)  # 4/3 < 3
    assert order([heavy, b], [job("a", 1), job("b", 2)]) == ["a1", "b2"]


def test_between_teams_equally_served_now_less_decayed_usage_goes_first() -> None:
    a = team("a", usage=7200.0)
    b = team("b", usage=3600.0)
    assert order([a, b], [job("a", 1), job("b", 2)]) == ["b2", "a1"]
    # usage counts per unit of weight
    assert order([team("a", usage=7200.0, share_weight=4.0), b], [job("a", 1), job("b", 2)]) == ["a1", "b2"]
    # a difference under one GPU-minute per weight is a tie: priority, then age, decide
    assert order([team("a", usage=59.0), team("b", usage=0.5)], [job("a", 1), job("b", 2)]) == ["a1", "b2"]
    assert order([team("a", usage=61.0), team("b", usage=0.5)], [job("a", 1), job("b", 2)]) == ["b2", "a1"]
    # GPUs running now come before usage
    assert order([a, team("b", usage=0.0, gpus_in_pool=1)], [job("a", 1), job("b", 2)]) == ["a1", "b2"]


def test_a_team_below_its_guarantee_goes_first() -> None:
    a = team("a", gpus_in_pool=3, guaranteed_gpus=4)  # below its guarantee, though it runs more
    b = team("b", gpus_in_pool=1)
    assert order([a, b], [job("a", 1), job("b", 2)]) == ["a1", "b2"]
    at = team("a", gpus_in_pool=4, guaranteed_gpus=4)  # at it: plain fair share again
    assert order([at, b], [job("a", 1), job("b", 2)]) == ["b2", "a1"]


def test_then_priority_then_age() -> None:
    a, b = team("a"), team("b")
    assert order([a, b], [job("a", 5), job("b", 6, priority=1)]) == ["b6", "a5"]
    assert order([a, b], [job("a", 5), job("b", 6)]) == ["a5", "b6"]


def test_limits_skip_a_team_and_say_which() -> None:
    at_jobs = team("a", running_jobs=2, max_running_jobs=2)
    assert limit_reason(at_jobs, 1) == "team at max_running_jobs (2 of 2)"
    gpus = team("a", running_jobs=1, gpus_running=6, max_gpus=8)
    assert limit_reason(gpus, 2) is None
    assert limit_reason(gpus, 4) == "team at max_gpus (6 of 8 running, 4 asked)"
    assert limit_reason(team("a", max_gpus=0), 1) == "team at max_gpus (0 of 0 running, 1 asked)"
    assert order([gpus, team("b", gpus_in_pool=7)], [job("a", 1, gpus=4), job("b", 2)]) == ["b2"]


def test_a_job_fits_the_free_slots_of_the_node_or_waits() -> None:
    a, b = team("a"), team("b", gpus_in_pool=1)
    jobs = [job("a", 1, gpus=4), job("b", 2, gpus=2)]
    assert order([a, b], jobs, free_slots=4) == ["a1", "b2"]
    assert order([a, b], jobs, free_slots=3) == ["b2"]
    assert order([a, b], jobs, free_slots=1) == []


def test_jobs_tried_this_round_are_skipped() -> None:
    teams = {"a": team("a"), "b": team("b")}
    snapshot = Snapshot(teams, [job("a", 1), job("b", 2)], 1, frozenset({"a1"}))
    assert [c.job_id for c in rank(snapshot)] == ["b2"]


# -- a pool of nodes ---------------------------------------------------------------------------------
NOW = 10_000.0


def pool(
    teams: list[TeamState],
    jobs: list[Candidate],
    running: list[Running],
    nodes: dict[str, int],
    node: str | None = None,
) -> Snapshot:
    """A pool whose teams' GPU counts follow `running` (as the claim reads them)."""
    counted = {
        t.id: TeamState(
            **{
                **t.__dict__,
                "gpus_in_pool": sum(r.gpus for r in running if r.team_id == t.id),
                "gpus_running": sum(r.gpus for r in running if r.team_id == t.id),
                "running_jobs": sum(1 for r in running if r.team_id == t.id),
            }
        )
        for t in teams
    }
    free = 0
    if node is not None:
        free = nodes[node] - sum(r.gpus for r in running if r.node == node)
    return Snapshot(counted, jobs, free, frozenset(), node, nodes, running, NOW, "default")


def run(team_id: str, n: int, node: str, gpus: int = 1, **fields: object) -> Running:
    values: dict[str, object] = {"started_at": NOW - 3600, **fields}
    return Running(f"{team_id}-run{n}", team_id, gpus, node, **values)  # type: ignore[arg-type]


def waiting(team_id: str, n: int, gpus: int = 1, priority: int = 0, waited: float = 3600.0) -> Candidate:
    return Candidate(team_id, f"{team_id}{n}", gpus, priority, n, queued_at=NOW - waited)


def test_a_big_job_first_in_line_reserves_the_node_that_frees_its_slots_first() -> None:
    a, b = team("a"), team("b")
    big = waiting("a", 1, gpus=2)
    small = waiting("b", 2)
    # n1 has one slot free and its other job ends in 10 min; n2's two jobs end in an hour.
    running = [
        run("b", 1, "n1", finish_at=NOW + 600),
        run("b", 2, "n2", finish_at=NOW + 3600),
        run("b", 3, "n2", finish_at=NOW + 3600),
    ]
    nodes = {"n1": 2, "n2": 2}
    held = reservations(pool([a, b], [big, small], running, nodes))
    assert list(held) == ["n1"] and held["n1"].job == big and held["n1"].start_at == NOW + 600
    assert held["n1"].surplus == 0
    # n1 keeps its free slot for the big job: a non-preemptible small job may not take it, a
    # preemptible one only as backfill for it (preempted once the slots are due) ...
    stiff = Candidate("b", "b2", 1, 0, 2, queued_at=NOW, preemptible=False)
    assert [c.job_id for c in rank(pool([a, b], [big, stiff], running, nodes, node="n1"))] == []
    snapshot = pool([a, b], [big, small], running, nodes, node="n1")
    assert [c.job_id for c in rank(snapshot)] == ["b2"] and backfill_for(snapshot, small) == "a1"
    # ... but where the node will have more than the big job needs, a job may take the surplus now:
    # n1 (3 slots) runs one 2-GPU job ending in 10 min: 3 free then, the big job needs 2.
    wide = [run("b", 1, "n1", gpus=2, finish_at=NOW + 600), *running[1:]]
    held = reservations(pool([a, b], [big, small], wide, {"n1": 3, "n2": 2}))
    assert held["n1"].job == big and held["n1"].surplus == 1
    wide_snapshot = pool([a, b], [big, stiff], wide, {"n1": 3, "n2": 2}, node="n1")
    assert [c.job_id for c in rank(wide_snapshot)] == ["b2"] and backfill_for(wide_snapshot, stiff) is None
    # Running jobs whose end is not known yet: only preemptible jobs backfill the reserved node.
    unknown = [run("b", 1, "n1"), run("b", 2, "n2"), run("b", 3, "n2")]
    held = reservations(pool([a, b], [big, small], unknown, nodes))
    assert held["n1"].start_at == float("inf") and held["n1"].surplus == 0
    assert rank(pool([a, b], [big, stiff], unknown, nodes, node="n1")) == []


def test_backfill_is_preempted_once_the_reserved_slots_are_due() -> None:
    a, b = team("a"), team("b")
    big = waiting("a", 1, gpus=2)
    young = NOW - 10  # backfill is preempted whatever its runtime: that was the deal
    filler = run("b", 2, "n1", started_at=young, backfill_for="a1")
    # the other job on n1 still runs: nothing is due yet
    running = [run("b", 1, "n1", finish_at=NOW + 60), filler]
    assert victims(pool([a, b], [big], running, {"n1": 2})) == []
    # it ended: the backfill makes way at once
    found = preemptions(pool([a, b], [big], [filler], {"n1": 2}), POLICY)
    assert [v.job_id for v in found[0].victims] == ["b-run2"] and found[0].job == big
    assert found[0].reason == "Preempted by a1: it ran on GPUs reserved for that job, which are now due"


def test_no_reservation_while_the_first_in_line_fits_somewhere() -> None:
    a, b = team("a"), team("b")
    running = [run("b", 1, "n1")]
    snapshot = pool([a, b], [waiting("a", 1), waiting("b", 2)], running, {"n1": 2, "n2": 2})
    assert reservations(snapshot) == {}


def test_a_job_that_preempted_others_holds_their_node() -> None:
    a, b = team("a"), team("b")
    held_job = Candidate("b", "b9", 2, 0, 9, queued_at=NOW, reserved_node="n1")
    other = waiting("a", 1)
    running = [run("a", 1, "n1", stop="preempt"), run("a", 2, "n1", stop="preempt")]
    nodes = {"n1": 2, "n2": 1}
    assert reservations(pool([a, b], [other, held_job], running, nodes))["n1"].job == held_job
    # the node (once the victims stopped) starts the job they made way for, not another team's
    stopped = pool([a, b], [other, held_job], [], nodes, node="n1")
    assert [c.job_id for c in rank(stopped)] == ["b9"]
    # and no other node starts it
    assert [c.job_id for c in rank(pool([a, b], [other, held_job], [], nodes, node="n2"))] == ["a1"]


# -- why a job waits: one case per reason -------------------------------------------------------------


def reasons(snapshot: Snapshot, queued: list[Candidate]) -> dict[str, str]:
    return queue_reasons(snapshot, queued)


def test_reason_waiting_for_k_gpus_on_one_node() -> None:
    a, b = team("a", gpus_in_pool=0), team("b")
    job4 = waiting("a", 1, gpus=4)
    snapshot = pool([a, b], [job4], [run("b", 1, "n1"), run("b", 2, "n2", gpus=2)], {"n1": 4, "n2": 4})
    # the first in line: it holds a node
    assert reasons(snapshot, [job4])["a1"].startswith(
        "first in line: waiting for 4 GPUs on one node of pool default (most free on a node: 3)"
    )
    # not first in line (another team goes first), and nothing fits it
    b_first = waiting("b", 0, gpus=4)
    others = [run("c", 1, "n1"), run("c", 2, "n2")]
    snapshot = pool([a, team("b")], [job4, b_first], others, {"n1": 4, "n2": 4})
    text = reasons(snapshot, [job4, b_first])["a1"]
    assert text.startswith("waiting for 4 GPUs on one node of pool default (most free on a node: 3)"), text


def test_reason_team_at_max_gpus() -> None:
    a = team("a", max_gpus=8)
    running = [run("a", i, f"n{i}", gpus=4) for i in (1, 2)]
    snapshot = pool([a], [waiting("a", 9)], running, {"n1": 8, "n2": 8})
    assert reasons(snapshot, [waiting("a", 9)])["a9"] == "team at max_gpus (8 of 8 running, 1 asked)"


def test_reason_jobs_of_teams_with_less_recent_usage_go_first() -> None:
    teams = [team("a", usage=99_999.0), team("b"), team("c"), team("d")]
    jobs = [waiting("a", 1), waiting("b", 2), waiting("c", 3), waiting("d", 4)]
    snapshot = pool(teams, jobs, [], {"n1": 1})
    text = reasons(snapshot, jobs)["a1"]
    assert text.endswith("; 3 jobs of teams with fewer GPUs running or less recent usage go first"), text


def test_reason_gpus_reserved_for_another_job() -> None:
    a, b = team("a"), team("b", gpus_in_pool=1)
    big = waiting("a", 1, gpus=2)
    small = Candidate("b", "b2", 1, 0, 2, queued_at=NOW, preemptible=False)  # may not backfill
    running = [run("b", 1, "n1", finish_at=NOW + 60)]
    snapshot = pool([a, b], [big, small], running, {"n1": 2})
    assert reasons(snapshot, [big, small])["b2"].startswith("GPUs reserved for a1 (needs 2)")


def test_reason_no_worker_has_k_slots() -> None:
    snapshot = pool([team("a")], [waiting("a", 1, gpus=8)], [], {"n1": 4, "n2": 2})
    assert reasons(snapshot, [waiting("a", 1, gpus=8)])["a1"] == (
        "no worker in pool default has 8 slots (the largest has 4)"
    )
    assert reasons(pool([team("a")], [waiting("a", 1)], [], {}), [waiting("a", 1)])["a1"] == (
        "no worker of pool default is running"
    )


def test_reason_earlier_jobs_of_the_same_team() -> None:
    jobs = [waiting("a", 1), waiting("a", 2), waiting("a", 3, priority=5)]
    snapshot = pool([team("a")], [jobs[2]], [run("x", 1, "n1")], {"n1": 1})
    said = reasons(snapshot, jobs)
    assert said["a1"] == "1 earlier job of your team goes first (priority, then age)"
    assert said["a2"] == "2 earlier jobs of your team go first (priority, then age)"


# -- preemption ----------------------------------------------------------------------------------------
POLICY = PreemptPolicy(fairshare=True, after_s=300, min_runtime_s=600)


def victims(snapshot: Snapshot, policy: PreemptPolicy = POLICY) -> list[str]:
    found = preemptions(snapshot, policy)
    return [v.job_id for p in found for v in p.victims]


def test_a_team_below_its_share_reclaims_from_the_team_furthest_above_after_the_wait() -> None:
    a, b = team("a"), team("b")
    full = [run("a", 1, "n1"), run("a", 2, "n1")]
    assert victims(pool([a, b], [waiting("b", 1)], full, {"n1": 2})) in (["a-run1"], ["a-run2"])
    found = preemptions(pool([a, b], [waiting("b", 1)], full, {"n1": 2}), POLICY)[0]
    assert found.reason.startswith("Preempted by b1 for fair share") and found.node == "n1"
    # not before it has waited PREEMPT_AFTER_S, and not with fair-share preemption off
    assert victims(pool([a, b], [waiting("b", 1, waited=60)], full, {"n1": 2})) == []
    off = PreemptPolicy(fairshare=False, after_s=300, min_runtime_s=600)
    assert victims(pool([a, b], [waiting("b", 1)], full, {"n1": 2}), off) == []
    # the youngest of the lowest priority goes first
    mixed = [run("a", 1, "n1", started_at=NOW - 5000), run("a", 2, "n1", started_at=NOW - 4000)]
    assert victims(pool([a, b], [waiting("b", 1)], mixed, {"n1": 2})) == ["a-run2"]


def test_never_a_job_younger_than_the_minimum_runtime_nor_a_non_preemptible_one() -> None:
    a, b = team("a"), team("b")
    young = [run("a", 1, "n1", started_at=NOW - 60), run("a", 2, "n1", started_at=NOW - 60)]
    assert victims(pool([a, b], [waiting("b", 1)], young, {"n1": 2})) == []
    exempt = [run("a", 1, "n1", preemptible=False), run("a", 2, "n1", preemptible=False)]
    assert victims(pool([a, b], [waiting("b", 1)], exempt, {"n1": 2})) == []


def test_no_preemption_back_and_forth() -> None:
    a, b = team("a"), team("b")
    # a runs one 2-GPU job on a 3-GPU pool, b one 1-GPU job: b's next job (b at 1, share 1.5) would
    # leave a at 0 < b's 2: not done.
    running = [run("a", 1, "n1", gpus=2), run("b", 1, "n2")]
    assert victims(pool([a, b], [waiting("b", 2)], running, {"n1": 2, "n2": 1})) == []
    # equal teams at 2 and 2: nobody is below its share
    even = [run("a", 1, "n1"), run("a", 2, "n1"), run("b", 1, "n2"), run("b", 2, "n2")]
    assert victims(pool([a, b], [waiting("b", 3), waiting("a", 3)], even, {"n1": 2, "n2": 2})) == []


def test_a_preemption_must_shrink_the_gap_between_the_two_teams() -> None:
    # bench/pool_sim.py's case: t5 (weight 3) 12 GPUs, t6 (weight 4) 9; t6's 4-GPU job may take a
    # 4-GPU job of t5 (gap 4 - 2.25 = 1.75 becomes |2.67 - 3.25| = 0.58) ...
    t5, t6 = team("t5", share_weight=3.0), team("t6", share_weight=4.0)
    running = [
        *(run("t5", i, f"n{i}", gpus=4) for i in (1, 2, 3)),
        run("t6", 4, "n4", gpus=4), run("t6", 5, "n5", gpus=4), run("t6", 6, "n6", gpus=1),
    ]  # fmt: skip
    nodes = {f"n{i}": 4 for i in range(1, 7)}
    assert len(victims(pool([t5, t6], [waiting("t6", 7, gpus=4)], running, nodes))) == 1
    # ... and t5's job then does not take it back (the gap would grow from 0.58 to 1.75)
    after = [
        run("t5", 1, "n1", gpus=4), run("t5", 2, "n2", gpus=4), run("t6", 4, "n4", gpus=4),
        run("t6", 5, "n5", gpus=4), run("t6", 6, "n6", gpus=1), run("t6", 7, "n3", gpus=4),
    ]  # fmt: skip
    assert victims(pool([t5, t6], [waiting("t5", 8, gpus=4)], after, nodes)) == []


def test_on_one_slot_the_team_that_used_the_pool_more_lately_yields() -> None:
    a, b = team("a", usage=7200.0), team("b", usage=0.0)
    one = [run("a", 1, "n1")]
    assert victims(pool([a, b], [waiting("b", 1)], one, {"n1": 1})) == ["a-run1"]
    # b now runs, having used less than a: a waits its turn rather than preempt straight back
    back = [run("b", 1, "n1")]
    turn = pool([team("a", usage=7200.0), team("b", usage=600.0)], [waiting("a", 2)], back, {"n1": 1})
    assert victims(turn) == []
    # once b has used more than a, a's turn comes
    later = pool([team("a", usage=1000.0), team("b", usage=7200.0)], [waiting("a", 2)], back, {"n1": 1})
    assert victims(later) == ["b-run1"]


def test_priority_preempts_only_the_same_teams_lower_priority_jobs_and_at_once() -> None:
    a, b = team("a"), team("b", gpus_in_pool=0)
    full = [run("a", 1, "n1", priority=0), run("a", 2, "n1", priority=50)]
    urgent_a = waiting("a", 3, priority=100, waited=0.0)
    assert victims(pool([a, b], [urgent_a], full, {"n1": 2})) == ["a-run1"]
    found = preemptions(pool([a, b], [urgent_a], full, {"n1": 2}), POLICY)[0]
    assert found.reason == "Preempted by a3 (priority 100) of the same team"
    # b's priority 100 alone never preempts a (fair share off, no guarantee; b waited long)
    off = PreemptPolicy(fairshare=False, after_s=300, min_runtime_s=600)
    assert victims(pool([a, b], [waiting("b", 1, priority=100)], full, {"n1": 2}), off) == []


def test_a_team_below_its_guarantee_reclaims_from_teams_above_theirs() -> None:
    a, b = team("a", guaranteed_gpus=1), team("b", guaranteed_gpus=2)
    off = PreemptPolicy(fairshare=False, after_s=300, min_runtime_s=600)
    running = [run("a", 1, "n1"), run("a", 2, "n1"), run("a", 3, "n2"), run("b", 1, "n2")]
    found = preemptions(pool([a, b], [waiting("b", 2)], running, {"n1": 2, "n2": 2}), off)
    assert len(found[0].victims) == 1 and found[0].victims[0].team_id == "a"
    assert "below its guaranteed GPUs in pool default (1 of 2)" in found[0].reason
    # a team at its guarantee is not preempted below it
    at = [run("a", 1, "n1"), run("b", 1, "n2")]
    at_guarantee = pool([team("a", guaranteed_gpus=1), b], [waiting("b", 2)], at, {"n1": 1, "n2": 1})
    assert victims(at_guarantee, off) == []


def test_one_preemption_at_a_time() -> None:
    a, b = team("a"), team("b")
    stopping = [run("a", 1, "n1", stop="preempt"), run("a", 2, "n1"), run("a", 3, "n2"), run("a", 4, "n2")]
    assert victims(pool([a, b], [waiting("b", 1)], stopping, {"n1": 2, "n2": 2})) == []
