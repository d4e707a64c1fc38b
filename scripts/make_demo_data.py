"""Generate the bundled demo dataset: short arithmetic word problems with worked answers.

    python scripts/make_demo_data.py        # rewrites examples/arithmetic/{train,valid}.jsonl

Deterministic (fixed seed). Chat format with the features the trainer must handle: system
prompts, multi-turn follow-ups, and assistant turns with weight 0 (shown as context, not trained).
Answers follow one fixed shape ending in "The answer is N." so that learning is visible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Ines", "Kai", "Lena", "Ravi", "Sofia", "Tom"]
THINGS = [
    "apples", "stickers", "marbles", "books", "coins",
    "pencils", "shells", "cards", "stamps", "cookies",
]  # fmt: skip
SYSTEMS = [
    "You are a careful math tutor. Show each step, then give the final answer.",
    "Solve the problem step by step.",
]


def pronoun(name: str) -> str:
    return "She" if name in {"Mia", "Ava", "Zoe", "Ines", "Lena", "Sofia"} else "He"


def problem(rng: random.Random) -> tuple[str, str, int, str, str]:
    """One problem of 1 to 3 operations: (question, worked answer, result, name, thing)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    he = pronoun(name)
    total = rng.randint(5, 40)
    question = [f"{name} has {total} {thing}."]
    steps = [f"{name} starts with {total} {thing}."]
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["buy", "give", "double"] if total < 30 else ["buy", "give"])
        if op == "buy":
            k = rng.randint(2, 20)
            question.append(f"{he} gets {k} more.")
            steps.append(f"After getting {k} more: {total} + {k} = {total + k}.")
            total += k
        elif op == "give" and total > 2:
            k = rng.randint(1, total - 1)
            question.append(f"{he} gives away {k}.")
            steps.append(f"After giving away {k}: {total} - {k} = {total - k}.")
            total -= k
        else:
            question.append(f"{he} doubles the pile.")
            steps.append(f"After doubling: {total} x 2 = {total * 2}.")
            total *= 2
    question.append(f"How many {thing} does {name} have now?")
    steps.append(f"The answer is {total}.")
    return " ".join(question), "\n".join(steps), total, name, thing


def example(rng: random.Random) -> dict[str, object]:
    messages: list[dict[str, object]] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    question, answer, total, name, thing = problem(rng)
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        # A follow-up turn; sometimes the first answer is context only (weight 0).
        if rng.random() < 0.5:
            messages[-1]["weight"] = 0
        k = rng.randint(1, 15)
        messages += [
            {"role": "user", "content": f"And if {name} then gets {k} more {thing}?"},
            {
                "role": "assistant",
                "content": f"{name} had {total}.\nAfter getting {k} more: "
                f"{total} + {k} = {total + k}.\nThe answer is {total + k}.",
            },
        ]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(20260805)
    out = Path(__file__).resolve().parent.parent / "examples" / "arithmetic"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", 400), ("valid.jsonl", 40)):
        with (out / name).open("w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng)) + "\n")
    print(f"wrote {out}/train.jsonl (400) and valid.jsonl (40)")


if __name__ == "__main__":
    main()
