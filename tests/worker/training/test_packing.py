"""Splitting a step over processes and micro-batches, and padding-free packing: the same tokens,
the same targets, the same logits and gradients as padded batches."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.training.conftest import build_tokenizer, chat_rows, write_jsonl
from worker.training.data import (
    MicroBatch,
    TokenizedExample,
    eval_batches,
    load_dataset,
    micro_batch_count,
    micro_batches,
    shard_step,
)


def fake_examples(n: int, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, 40)
        # a prompt, then a trained answer; every fifth all trained, its first token too (nothing predicts it)
        trained = [i % 5 == 0 or j >= length // 2 for j in range(length)]
        out.append(TokenizedExample([rng.randint(5, 300) for _ in range(length)], trained, i + 1))
    return out


@pytest.fixture(scope="module")
def chat_examples(tmp_path_factory: pytest.TempPathFactory) -> list[TokenizedExample]:
    """Real tokenised multi-turn conversations (masked prompts, weight-0 turns) for the tiny model."""
    path = write_jsonl(tmp_path_factory.mktemp("pack") / "t.jsonl", chat_rows(12))
    data = load_dataset(
        path, build_tokenizer(), max_seq_length=512, overlength="drop", max_line_bytes=1 << 20
    )
    return data.examples


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shard_step_partitions_the_step_exactly(world_size: int) -> None:
    examples = fake_examples(100)
    step = random.Random(1).sample(range(100), 29)
    shards = [shard_step(examples, step, rank, world_size) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == sorted(step)  # union = step, disjoint
    # deterministic, whatever order the step lists its examples in
    shuffled = random.Random(2).sample(step, len(step))
    assert shards == [shard_step(examples, shuffled, rank, world_size) for rank in range(world_size)]
    # balanced: sizes differ by at most one, tokens by at most the longest example
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    tokens = [sum(len(examples[i].input_ids) for i in shard) for shard in shards]
    assert max(tokens) - min(tokens) <= max(len(examples[i].input_ids) for i in step)
    for size in (1, 2, 3, 5, 8, 40):
        busiest = max(len(micro_batches(examples, shard, size, pad_id=0)) for shard in shards)
        assert micro_batch_count(len(step), world_size, size) == busiest


def test_shard_step_deals_longest_first_round_robin() -> None:
    examples = [TokenizedExample([1] * n, [True] * n, i) for i, n in enumerate([5, 9, 9, 2, 7])]
    # longest first, ties by index: 1 (9), 2 (9), 4 (7), 0 (5), 3 (2)
    assert shard_step(examples, [0, 1, 2, 3, 4], 0, 2) == [1, 4, 3]
    assert shard_step(examples, [0, 1, 2, 3, 4], 1, 2) == [2, 0]
    assert shard_step(examples, [3], 1, 2) == []  # more processes than sequences: an empty share
    with pytest.raises(ValueError, match="rank 2"):
        shard_step(examples, [0], 2, 2)


def test_micro_batch_count() -> None:
    assert micro_batch_count(8, 1, 4) == 2
    assert micro_batch_count(8, 3, 2) == 2  # ranks get 3, 3, 2 sequences: 2 micro-batches at most
    assert micro_batch_count(9, 2, 5) == 1
    assert micro_batch_count(3, 8, 1) == 1


def test_micro_batches_are_consecutive_longest_first_groups() -> None:
    examples = fake_examples(30)
    indices = list(range(3, 20))
    batches = micro_batches(examples, indices, 4, pad_id=0)
    assert [b.input_ids.shape[0] for b in batches] == [4, 4, 4, 4, 1]
    widths = [b.input_ids.shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)
    assert sum(b.n_real for b in batches) == sum(len(examples[i].input_ids) for i in indices)
    assert all(b.position_ids is None and b.attention_mask is not None for b in batches)
    with pytest.raises(ValueError, match="micro_batch_size"):
        micro_batches(examples, indices, 0, pad_id=0)


def test_packed_micro_batches_have_no_padding_and_the_same_targets() -> None:
    examples = fake_examples(30)
    indices = list(range(30))
    padded = micro_batches(examples, indices, 8, pad_id=0)
    packed = micro_batches(examples, indices, 8, pad_id=0, packing=True)
    assert len(packed) == len(padded) == 4
    for pad, pack in zip(padded, packed, strict=True):
        assert pack.attention_mask is None and pack.position_ids is not None
        assert pad.attention_mask is not None and pad.position_ids is None
        assert pack.input_ids.shape == pack.position_ids.shape == pack.trained.shape == (1, pad.n_real)
        assert pack.n_processed == pack.n_real == pad.n_real  # padding fraction 0
        assert pack.n_trained == pad.n_trained
        real = pad.attention_mask.bool()
        assert torch.equal(pack.input_ids[0], pad.input_ids[real])  # the same tokens, in the same order
        assert torch.equal(pack.trained[0], pad.trained[real])  # the same targets
        starts = pack.position_ids[0] == 0
        assert int(starts.sum()) == pad.input_ids.shape[0]  # positions restart for every sequence
        assert not pack.trained[0][starts].any()  # a sequence's first token is never a target
        lengths = real.sum(1).tolist()
        assert pack.position_ids[0].tolist() == [p for n in lengths for p in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_eval_batches_deal_the_validation_set_over_processes(packing: bool) -> None:
    examples = fake_examples(23)
    seen: list[int] = []
    for rank in range(3):
        batches = list(eval_batches(examples, 4, 0, packing=packing, rank=rank, world_size=3))
        share = shard_step(examples, range(23), rank, 3)
        assert len(batches) <= micro_batch_count(23, 3, 4)
        assert sum(b.n_trained for b in batches) == sum(
            examples[i].n_trained - examples[i].trained[0] for i in share
        )
        seen.extend(share)
    assert sorted(seen) == list(range(23))
    whole = list(eval_batches(examples, 4, 0, packing=packing))
    assert sum(b.n_real for b in whole) == sum(len(e.input_ids) for e in examples)


def _nll_and_grads(
    model: Any, batch: MicroBatch
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [B, T, V] and the summed NLL's gradients, called as the trainer calls the backbone."""
    model.zero_grad(set_to_none=True)
    hidden = model.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    logits = model.lm_head(hidden)
    targets = batch.trained[:, 1:]
    log_p = torch.log_softmax(logits[:, :-1].double(), -1).gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    nll = -log_p[targets].sum()
    nll.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), nll.detach(), grads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_row_equals_padded_batch_logits_and_gradients(
    attn: str, tiny_model: Path, chat_examples: list[TokenizedExample]
) -> None:
    """transformers honours packed boundaries (position ids restarting, no attention mask): each
    sequence attends only to itself, so logits and gradients are those of the padded batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn, dtype=torch.float32)
    by_length = sorted(range(len(chat_examples)), key=lambda i: len(chat_examples[i].input_ids))
    chosen = [by_length[0], by_length[len(by_length) // 2], by_length[-1]]  # three different lengths
    assert len({len(chat_examples[i].input_ids) for i in chosen}) == 3
    (padded,) = micro_batches(chat_examples, chosen, 3, pad_id=0)
    (packed,) = micro_batches(chat_examples, chosen, 3, pad_id=0, packing=True)
    assert padded.n_processed > padded.n_real and packed.n_processed == packed.n_real

    pad_logits, pad_nll, pad_grads = _nll_and_grads(model, padded)
    pack_logits, pack_nll, pack_grads = _nll_and_grads(model, packed)
    assert padded.attention_mask is not None
    real = padded.attention_mask.bool()
    assert (pack_logits[0] - pad_logits[real]).abs().max() <= 1e-5
    assert pack_nll.item() == pytest.approx(pad_nll.item(), rel=1e-6)
    assert set(pack_grads) == set(pad_grads)
    for name, grad in pad_grads.items():
        assert float((pack_grads[name] - grad).norm() / grad.norm().clamp_min(1e-30)) <= 1e-5, name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_run_trains_what_a_padded_run_trains(make_config: Any, tmp_path: Path, attn: str) -> None:
    """Through the trainer: two steps with packing equal two padded steps (weights and metrics to
    1e-5), and the packed steps process no padding."""
    from tests.worker.training.test_distributed import assert_same_weights
    from worker.training.trainer import Trainer

    results = []
    for packing in (False, True):
        config = make_config(
            max_steps=2, micro_batch_size=4, packing=packing, attn_implementation=attn,
            output_dir=tmp_path / f"packing-{packing}",
        )  # fmt: skip
        trainer = Trainer(config)
        trainer.setup()
        trainer.train()
        rows = trainer.log.metrics.read()
        results.append((rows, {k: v.detach().clone() for k, v in trainer.lm.state_dict().items()}))
    (padded_rows, padded), (packed_rows, packed) = results
    assert all(r["padding_fraction"] > 0 for r in padded_rows)
    assert all(r["padding_fraction"] == 0 for r in packed_rows)
    for a, b in zip(padded_rows, packed_rows, strict=True):
        assert a["step_tokens"] == b["step_tokens"]
        for key in ("loss", "nll", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert_same_weights(padded, packed)
