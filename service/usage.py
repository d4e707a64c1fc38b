"""A team's GPU usage in a pool, as fair share counts it: GPU-seconds (K x running seconds per job)
that halve every `TUNEPOOL_FAIRSHARE_HALF_LIFE_S`. The claim (worker/claim.py) adds to it and orders
teams by it; the pool view and /metrics show it."""

from __future__ import annotations

import math


def decayed(value: float, as_of: float, now: float, half_life_s: float) -> float:
    """`value` (GPU-seconds as of `as_of`) seen at `now`: halved for every `half_life_s` since."""
    if value == 0.0 or now <= as_of:
        return value
    return value * math.pow(0.5, (now - as_of) / half_life_s)


def add_usage(value: float, as_of: float, now: float, half_life_s: float, gpu_seconds: float) -> float:
    """The decayed total as of `now` after adding `gpu_seconds` used just now."""
    return decayed(value, as_of, now, half_life_s) + gpu_seconds
