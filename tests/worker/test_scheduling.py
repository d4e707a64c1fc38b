"""The pool's policy (worker/scheduling.py) as pure functions: decay, limits, fit, order."""

from __future__ import annotations

import pytest

from worker.scheduling import Candidate, Snapshot, TeamState, add_usage, decayed, limit_reason, rank

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
