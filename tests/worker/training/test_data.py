"""Which tokens are trained, truncation, and how little padding length grouping leaves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.worker.training.conftest import build_tokenizer, chat_rows, smollm2_gguf, write_jsonl
from worker.training.data import (
    TemplateError,
    load_dataset,
    micro_batches,
    plan_epoch,
    tokenize_example,
)
from worker.training.formats import ChatExample, Message, PromptCompletionExample

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    return build_tokenizer()


def trained_runs(tokenizer: Any, ids: list[int], trained: list[bool]) -> list[str]:
    """Decode each maximal run of consecutive trained tokens."""
    runs: list[list[int]] = []
    for i, (token, on) in enumerate(zip(ids, trained, strict=True)):
        if on:
            if i == 0 or not trained[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


CONVERSATION = ChatExample(
    messages=(
        Message("system", "You are terse.", 0),
        Message("user", "What is 2 + 2?", 0),
        Message("assistant", "It is 4.\nThe answer is 4.", 0),  # weight 0: context only
        Message("user", "And 3 + 3?", 0),
        Message("assistant", "6, since 3 + 3 = 6.", 1),
        Message("user", "Thanks! ünïcödé 👍", 0),
        Message("assistant", " Spaces  and\ttabs stay ", 1),
    ),
    line=1,
)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_chat_trains_exactly_weighted_assistant_contents_plus_end_of_turn(
    which: str, tiny_tokenizer: Any, smollm2_tokenizer: Any
) -> None:
    tokenizer = tiny_tokenizer if which == "tiny" else smollm2_tokenizer
    tok = tokenize_example(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, tok.input_ids, tok.trained) == [
        "6, since 3 + 3 = 6.<|im_end|>",
        " Spaces  and\ttabs stay <|im_end|>",
    ]
    # the whole sequence is the template's rendering, token for token in text
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONVERSATION.messages], tokenize=False
    )
    assert tokenizer.decode(tok.input_ids, skip_special_tokens=False) == rendered
    # nothing after the end-of-turn token is trained (the template's "\n" after <|im_end|>)
    last = max(i for i, on in enumerate(tok.trained) if on)
    assert tokenizer.decode(tok.input_ids[last + 1 :], skip_special_tokens=False) == "\n"


def test_system_prompt_free_conversation_with_smollm2_default_system(smollm2_tokenizer: Any) -> None:
    """SmolLM2's template inserts its own system prompt when none is given: never trained."""
    example = ChatExample((Message("user", "Hi", 0), Message("assistant", "Hello!", 1)), line=3)
    tok = tokenize_example(smollm2_tokenizer, example)
    assert "SmolLM" in smollm2_tokenizer.decode(tok.input_ids)
    assert trained_runs(smollm2_tokenizer, tok.input_ids, tok.trained) == ["Hello!<|im_end|>"]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_prompt_completion_trains_completion_plus_eos(
    which: str, tiny_tokenizer: Any, smollm2_tokenizer: Any
) -> None:
    tokenizer = tiny_tokenizer if which == "tiny" else smollm2_tokenizer
    tok = tokenize_example(tokenizer, PromptCompletionExample("Translate: chat ->", " cat", line=1))
    assert trained_runs(tokenizer, tok.input_ids, tok.trained) == [" cat" + tokenizer.eos_token]
    assert tokenizer.decode(tok.input_ids, skip_special_tokens=False).startswith("Translate: chat ->")
    empty_prompt = tokenize_example(tokenizer, PromptCompletionExample("", "cat", line=2))
    assert not empty_prompt.trained[0]  # a start token comes first: position 0 predicts nothing
    assert trained_runs(tokenizer, empty_prompt.input_ids, empty_prompt.trained) == [
        "cat" + tokenizer.eos_token
    ]


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_tokenizer: Any) -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        tokenize_example(tokenizer, CONVERSATION)


def test_overlength_truncate_and_drop_are_counted(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = chat_rows(20)
    rows.append(
        {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "ok"}]}
    )
    rows.append(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y " * 400}]}
    )
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    normal = load_dataset(
        write_jsonl(tmp_path / "n.jsonl", rows[:20]),
        tiny_tokenizer,
        max_seq_length=10_000,
        overlength="drop",
        max_line_bytes=1 << 20,
    )
    limit = max(len(e.input_ids) for e in normal.examples)
    assert limit < 150
    common = {"max_seq_length": limit, "max_line_bytes": 1 << 20}
    kept = load_dataset(path, tiny_tokenizer, overlength="truncate", **common)
    # the long prompt leaves no trained token within the limit: dropped; the long answer is cut
    assert (kept.stats.n_truncated, kept.stats.n_dropped, len(kept.examples)) == (1, 1, 21)
    assert max(len(e.input_ids) for e in kept.examples) == limit
    dropped = load_dataset(path, tiny_tokenizer, overlength="drop", **common)
    assert (dropped.stats.n_truncated, dropped.stats.n_dropped, len(dropped.examples)) == (0, 2, 20)


def test_plan_is_deterministic_and_covers_each_example_once() -> None:
    lengths = [10 + (i * 37) % 200 for i in range(1000)]
    plan = plan_epoch(lengths, 16, seed=3, epoch=0, group_by_length=True)
    assert plan == plan_epoch(lengths, 16, seed=3, epoch=0, group_by_length=True)
    assert plan != plan_epoch(lengths, 16, seed=3, epoch=1, group_by_length=True)
    assert sorted(i for step in plan for i in step) == list(range(1000))
    assert sorted(len(step) for step in plan) == [8] + [16] * 62  # one partial step, not dropped
    # grouped: within a step, lengths are close (here the spread is under 10 tokens)
    assert max(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in plan) < 10


def test_bundled_dataset_padding_is_at_most_10_percent(smollm2_tokenizer: Any) -> None:
    """The demo's settings (batch 8 in 2 micro-batches) on the bundled data with the real tokenizer."""
    data = load_dataset(
        ROOT / "examples" / "arithmetic" / "train.jsonl",
        smollm2_tokenizer,
        max_seq_length=512,
        overlength="truncate",
        max_line_bytes=1 << 20,
    )
    lengths = [len(e.input_ids) for e in data.examples]
    assert max(lengths) > 2 * min(lengths)  # the lengths do vary
    for grouped, bound in ((True, 0.10), (False, 1.0)):
        real = processed = 0
        for step in plan_epoch(lengths, 8, seed=42, epoch=0, group_by_length=grouped):
            for batch in micro_batches(data.examples, step, 4, pad_id=0):
                real += batch.n_real
                processed += batch.n_processed
        padding = 1 - real / processed
        assert padding <= bound
        if not grouped:
            assert padding > 0.10  # without grouping the same data wastes more: the bound is meaningful
