"""From validated examples to padded micro-batches: tokenisation, loss masks, length grouping.

Which tokens are trained:
- chat: the content tokens of every assistant message with weight 1, plus the end-of-turn token
  the chat template puts right after it (`<|im_end|>` for ChatML); never the role header, never
  anything after the end-of-turn token.
- prompt/completion: the completion tokens plus the tokenizer's EOS token.

The rendered conversation is cut at the assistant contents and each piece is tokenised on its
own, so a mask boundary can never fall inside a token, and the trained tokens are exactly the
ones the model will have to produce after the header at generation time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.training.formats import ChatExample, Example, PromptCompletionExample, read_examples


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used to locate assistant turns."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    trained: list[bool]  # trained[t]: token t is a target (predicted from the tokens before it)
    line: int  # line in the JSONL file, for error messages

    @property
    def n_trained(self) -> int:
        return sum(self.trained)


@dataclass
class DatasetStats:
    n_lines: int = 0  # valid examples in the file
    n_truncated: int = 0  # longer than max_seq_length, cut and kept
    n_dropped: int = 0  # longer than max_seq_length (or no trained token left), skipped
    n_tokens: int = 0  # tokens of the kept examples
    n_trained_tokens: int = 0  # trained tokens of the kept examples


@dataclass
class TokenizedDataset:
    format: str
    examples: list[TokenizedExample]
    stats: DatasetStats = field(default_factory=DatasetStats)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):
        raise TemplateError("the chat template did not render to text")
    return text


def _encode(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]) if text else []


def tokenize_chat(tokenizer: Any, example: ChatExample) -> TokenizedExample:
    """Render with the model's chat template; train weight-1 assistant contents + end-of-turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the model's tokenizer has no chat template; use prompt/completion data")
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    full = _render(tokenizer, messages, generation_prompt=False)
    # (start, end, trained) character spans of each assistant content in `full`
    spans: list[tuple[int, int, bool]] = []
    for i, message in enumerate(example.messages):
        if message.role != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        if not full.startswith(prefix):
            raise TemplateError(
                "the chat template renders earlier turns differently once later turns are added; "
                "it cannot be used for multi-turn training"
            )
        start = len(prefix)
        for content in (message.content, message.content.strip()):
            found = full.find(content, start)
            if found != -1 and not full[start:found].strip():
                spans.append((found, found + len(content), message.weight == 1))
                break
        else:
            raise TemplateError(f"line {example.line}: the chat template altered an assistant message")
    ids: list[int] = []
    trained: list[bool] = []
    cursor = 0
    pending_end_of_turn = False
    for start, end, is_trained in [*spans, (len(full), len(full), False)]:
        between = _encode(tokenizer, full[cursor:start])
        if pending_end_of_turn:
            # The token right after a trained content is its end-of-turn token: trained too.
            if not between:
                between = [tokenizer.eos_token_id]
            trained.extend([True] + [False] * (len(between) - 1))
        else:
            trained.extend([False] * len(between))
        ids.extend(between)
        content_ids = _encode(tokenizer, full[start:end])
        ids.extend(content_ids)
        trained.extend([is_trained] * len(content_ids))
        pending_end_of_turn = is_trained
        cursor = end
    return TokenizedExample(ids, trained, example.line)


def tokenize_prompt_completion(tokenizer: Any, example: PromptCompletionExample) -> TokenizedExample:
    """Plain text: the prompt (with the tokenizer's own BOS, if any) untrained, completion + EOS trained."""
    if tokenizer.eos_token_id is None:
        raise TemplateError("the tokenizer has no EOS token to end completions with")
    prompt_ids = _encode(tokenizer, example.prompt, add_special_tokens=True)
    if not prompt_ids:
        # Position 0 has no prediction: start with BOS (or EOS) so the first completion token is trained.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prompt_ids = [start]
    completion_ids = [*_encode(tokenizer, example.completion), tokenizer.eos_token_id]
    return TokenizedExample(
        prompt_ids + completion_ids,
        [False] * len(prompt_ids) + [True] * len(completion_ids),
        example.line,
    )


def tokenize_example(tokenizer: Any, example: Example) -> TokenizedExample:
    if isinstance(example, ChatExample):
        return tokenize_chat(tokenizer, example)
    return tokenize_prompt_completion(tokenizer, example)


def load_dataset(
    path: Path, tokenizer: Any, *, max_seq_length: int, overlength: str, max_line_bytes: int
) -> TokenizedDataset:
    """Validate (every bad line is reported at once), tokenise, and apply the length policy."""
    fmt, raw = read_examples(path, max_line_bytes=max_line_bytes)
    stats = DatasetStats(n_lines=len(raw))
    kept: list[TokenizedExample] = []
    for example in raw:
        tok = tokenize_example(tokenizer, example)
        if len(tok.input_ids) > max_seq_length:
            if overlength == "drop":
                stats.n_dropped += 1
                continue
            tok = TokenizedExample(tok.input_ids[:max_seq_length], tok.trained[:max_seq_length], tok.line)
            if not any(tok.trained[1:]):
                stats.n_dropped += 1
                continue
            stats.n_truncated += 1
        kept.append(tok)
        stats.n_tokens += len(tok.input_ids)
        stats.n_trained_tokens += sum(tok.trained[1:])
    return TokenizedDataset(fmt, kept, stats)


def plan_epoch(
    lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The optimizer steps of one epoch, each a list of example indices; deterministic in (seed, epoch).

    With length grouping, a shuffled window of 64 steps' worth of examples is sorted by length and
    cut into steps, and the steps are shuffled again: neighbours in a step have similar lengths,
    so padding is small, while the order across the epoch stays random.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = 64 * batch_size
    steps: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: (-lengths[i], i))
        steps.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(steps)
    return steps


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return -(-n_examples // batch_size)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    trained: torch.Tensor  # [B, T] bool, token t is a target
    n_real: int  # real (non-padding) tokens
    n_trained: int  # trained target tokens (positions >= 1)

    @property
    def n_processed(self) -> int:
        return int(self.input_ids.numel())


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> MicroBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    trained = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        trained[row, :n] = torch.tensor(e.trained, dtype=torch.bool)
    trained[:, 0] = False  # nothing predicts the first token
    return MicroBatch(ids, mask, trained, int(mask.sum()), int(trained.sum()))


def micro_batches(
    examples: Sequence[TokenizedExample], step: Sequence[int], n_micro: int, pad_id: int
) -> list[MicroBatch]:
    """Split one optimizer step into up to n_micro micro-batches of similar length, longest first."""
    ordered = sorted(step, key=lambda i: (-len(examples[i].input_ids), i))
    size = -(-len(ordered) // n_micro)
    return [
        collate([examples[i] for i in ordered[j : j + size]], pad_id) for j in range(0, len(ordered), size)
    ]


def eval_batches(examples: Sequence[TokenizedExample], batch_size: int, pad_id: int) -> Iterator[MicroBatch]:
    ordered = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    for j in range(0, len(ordered), batch_size):
        yield collate([examples[i] for i in ordered[j : j + batch_size]], pad_id)
