"""API fuzzing, long run: schemathesis against every operation of a running `tunepool api`.

The same run as tests/service/test_fuzz.py (tests/service/api_fuzz.py: real ids as examples, a
team key and an admin key, checks not_a_server_error, status_code_conformance,
content_type_conformance, response_schema_conformance, response_headers_conformance; key
revocation in a pass of its own after the rest), with many more examples per operation.

It starts its own stack (tests/service/conftest.running_stack): a throwaway PostgreSQL database
`tunepool_test_<hex>` on 127.0.0.1:5432 (user postgres, trust; dropped at the end), migrated, the
API as a subprocess on a free port, Redis database 13 as the broker (only named: no worker runs).

Output: one JSON line on stdout (progress and every failure on stderr): operations fuzzed,
examples tried (requests sent, by phase), distinct failures by check (schemathesis reports each
kind of failure of an operation once per phase), engine errors, wall time. Exit status 1 if any
failure or error was found.

    .venv/bin/python -m bench.fuzz_api                      # 300 examples per operation and phase
    .venv/bin/python -m bench.fuzz_api --examples 1000 --seed 7
    .venv/bin/python -m bench.fuzz_api --backend sqlite --examples 50
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.service.api_fuzz import SEED, run_fuzz, seed_targets
from tests.service.conftest import running_stack


def log(message: str) -> None:
    print(f"[fuzz_api] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--examples", type=int, default=300, help="examples per operation and phase (default 300)")
    p.add_argument("--seed", type=int, default=SEED, help=f"generation seed (default {SEED})")
    p.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    args = p.parse_args(argv)
    if args.examples < 1:
        p.error("--examples: a positive integer")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="tunepool-fuzz-") as home,
        running_stack(args.backend, Path(home), redis_db=13) as stack,
    ):
        log(f"API at {stack.url} on {args.backend}; {args.examples} examples per operation and phase")
        targets = seed_targets(stack)
        report = run_fuzz(stack.url, targets, max_examples=args.examples, seed=args.seed)
        log_text = (Path(home) / "api.log").read_text(errors="replace")
    for line in report.details:
        log(line)
    result = {
        "benchmark": "fuzz_api",
        "backend": args.backend,
        "examples_per_operation": args.examples,
        "seed": args.seed,
        **report.figures(),
        "server_tracebacks": log_text.count("Traceback (most recent call last)"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    figures = main()
    sys.exit(1 if figures["failures"] or figures["errors"] else 0)
