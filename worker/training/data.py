"""From validated examples to micro-batches: tokenisation, loss masks, length grouping, sharding, packing.

Which tokens are trained:
- chat: the content tokens of every assistant message with weight 1, plus the end-of-turn token
  the chat template puts right after it; never the role header nor text the template adds around
  the content, never anything after the end-of-turn token (chat.py says how they are located).
- prompt/completion: the completion tokens plus the tokenizer's EOS token.

One optimizer step (a list of example indices, plan_epoch) is dealt to the job's processes
(shard_step: longest first, round robin, so each gets about the same tokens), and each process cuts
its share into micro-batches of at most `micro_batch_size` sequences of similar length
(micro_batches). A micro-batch is either padded (rows [B, T] right-padded, with an attention mask)
or packed (one row [1, total], no padding, position ids restarting at 0 for each sequence).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# TemplateError is re-exported: the CLI and the worker import it from here.
from worker.training.chat import TemplateError as TemplateError
from worker.training.chat import chat_tokens, encode
from worker.training.formats import ChatExample, Example, PromptCompletionExample, read_examples


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


def tokenize_chat(tokenizer: Any, example: ChatExample) -> TokenizedExample:
    """Render with the model's chat template; train weight-1 assistant contents + end-of-turn (chat.py)."""
    ids, trained = chat_tokens(tokenizer, example)
    return TokenizedExample(ids, trained, example.line)


def tokenize_prompt_completion(tokenizer: Any, example: PromptCompletionExample) -> TokenizedExample:
    """Plain text: the prompt (with the tokenizer's own BOS, if any) untrained, completion + EOS trained."""
    if tokenizer.eos_token_id is None:
        raise TemplateError("the tokenizer has no EOS token to end completions with")
    prompt_ids = encode(tokenizer, example.prompt, add_special_tokens=True)
    if not prompt_ids:
        # Position 0 has no prediction: start with BOS (or EOS) so the first completion token is trained.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prompt_ids = [start]
    completion_ids = [*encode(tokenizer, example.completion), tokenizer.eos_token_id]
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
    """One forward pass. Padded: B rows of T tokens. Packed: the sequences concatenated in one row.

    The model is called as `model(input_ids, attention_mask=, position_ids=, use_cache=False)`. A packed
    row has no attention mask: transformers then finds the sequences from the position ids (where they
    restart) and attends within each one only (a block-diagonal causal mask for eager and sdpa,
    varlen kernels for flash-attention). `use_cache=False` matters: with a KV cache (the default of
    most configs) transformers skips that detection and lets each sequence see the ones before it.
    """

    input_ids: torch.Tensor  # [B, T] right-padded, or [1, total] packed
    attention_mask: torch.Tensor | None  # [B, T] 1 for real tokens; None when packed
    trained: torch.Tensor  # [B, T] / [1, total] bool, token t is a target (never a sequence's first)
    n_real: int  # real (non-padding) tokens
    n_trained: int  # trained target tokens
    position_ids: torch.Tensor | None = None  # [1, total] 0, 1, ... per sequence if packed; else None

    @property
    def n_processed(self) -> int:
        return int(self.input_ids.numel())


def collate(examples: Sequence[TokenizedExample], pad_id: int, *, packing: bool = False) -> MicroBatch:
    if packing:
        return _pack(examples)
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


def _pack(examples: Sequence[TokenizedExample]) -> MicroBatch:
    ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long)[None]
    positions = torch.cat([torch.arange(len(e.input_ids)) for e in examples])[None]
    # A sequence's first token is predicted by nothing of its own (the token before it in the row is
    # the previous sequence's last): never a target.
    trained = torch.tensor([on for e in examples for on in e.trained], dtype=torch.bool)[None]
    trained &= positions > 0
    total = int(ids.numel())
    return MicroBatch(ids, None, trained, total, int(trained.sum()), position_ids=positions)


def _longest_first(examples: Sequence[TokenizedExample], indices: Sequence[int]) -> list[int]:
    return sorted(indices, key=lambda i: (-len(examples[i].input_ids), i))


def probe_window(examples: Sequence[TokenizedExample], pad_id: int, size: int = 512) -> MicroBatch:
    """At most `size` tokens of the shortest sequence that trains anything, around its first trained
    token: one small real batch (the head's start-up self-check runs it)."""
    example = min((e for e in examples if any(e.trained[1:])), key=lambda e: len(e.input_ids))
    first = next(t for t in range(1, len(example.trained)) if example.trained[t])
    start = max(0, min(first - size // 2, len(example.input_ids) - size))
    cut = TokenizedExample(
        example.input_ids[start : start + size], example.trained[start : start + size], example.line
    )
    return collate([cut], pad_id)


def empty_batch(examples: Sequence[TokenizedExample], pad_id: int) -> MicroBatch:
    """A pass that trains nothing (the shortest sequence, no target): what a process with fewer
    sequences than the others runs under FSDP, whose every pass holds collectives."""
    shortest = min(examples, key=lambda e: len(e.input_ids))
    return collate(
        [TokenizedExample(shortest.input_ids, [False] * len(shortest.input_ids), shortest.line)], pad_id
    )


def shard_step(
    examples: Sequence[TokenizedExample], step: Sequence[int], rank: int, world_size: int
) -> list[int]:
    """This process's share of one optimizer step: the step's examples longest first (ties by index),
    dealt round robin, so every process gets about the same number of tokens; deterministic."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return _longest_first(examples, step)[rank::world_size]


def micro_batch_count(step_size: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches of the busiest process, so that every process can run as many forward passes
    (sharded training runs collectives in each; a process with fewer runs empty passes)."""
    per_rank = -(-step_size // world_size)  # ceil: the first ranks get one sequence more
    return -(-per_rank // micro_batch_size)


def micro_batches(
    examples: Sequence[TokenizedExample],
    indices: Sequence[int],
    micro_batch_size: int,
    pad_id: int,
    *,
    packing: bool = False,
) -> list[MicroBatch]:
    """The given examples longest first, cut into consecutive micro-batches of at most
    micro_batch_size sequences (so neighbours have similar lengths), each padded or packed."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    ordered = _longest_first(examples, indices)
    return [
        collate([examples[i] for i in ordered[j : j + micro_batch_size]], pad_id, packing=packing)
        for j in range(0, len(ordered), micro_batch_size)
    ]


def eval_batches(
    examples: Sequence[TokenizedExample],
    batch_size: int,
    pad_id: int,
    *,
    packing: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[MicroBatch]:
    """This process's share of the validation set (dealt as shard_step deals a step), in batches."""
    share = shard_step(examples, range(len(examples)), rank, world_size)
    yield from micro_batches(examples, share, batch_size, pad_id, packing=packing)
