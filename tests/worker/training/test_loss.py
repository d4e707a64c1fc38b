"""The fused loss equals the published formula and TRL's DFT, value and gradients, to 1e-5."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.training.data import micro_batches
from worker.training.loss import LossMode, fused_linear_cross_entropy
from worker.training.trainer import Trainer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def naive_loss(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, mode: str, n: float
):
    """The paper's formula on full logits: -(1/N) sum sg(p) log p, or plain mean NLL for SFT."""
    logits = h @ w.t() + (b if b is not None else 0.0)
    log_p = torch.log_softmax(logits.double(), dim=-1).gather(1, y[:, None]).squeeze(1)
    weight = log_p.exp().detach() if mode == "dft" else torch.ones_like(log_p)
    return -(weight * log_p).sum() / n, log_p


@pytest.mark.parametrize("mode", ["sft", "dft"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_matches_naive_formula(mode: LossMode, bias: bool, chunk_size: int) -> None:
    torch.manual_seed(0)
    n, d, vocab, normalizer = 150, 24, 333, 411.0
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(vocab, d) * 0.3).requires_grad_()
    b = torch.randn(vocab, requires_grad=True) if bias else None
    y = torch.randint(0, vocab, (n,))
    with torch.no_grad():  # some correct predictions, so accuracy is tested
        y[:5] = (h[:5] @ w.t() + (b if b is not None else 0.0)).argmax(1)

    loss, stats = fused_linear_cross_entropy(
        h, w, y, bias=b, mode=mode, normalizer=normalizer, chunk_size=chunk_size
    )
    (2.5 * loss).backward()  # a non-unit upstream gradient must scale the gradients
    ours = [t.grad.clone() for t in (h, w, b) if t is not None and t.grad is not None]
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    ref, log_p = naive_loss(h, w, b, y, mode, normalizer)
    (2.5 * ref).backward()
    theirs = [t.grad for t in (h, w, b) if t is not None and t.grad is not None]

    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for g_ours, g_ref in zip(ours, theirs, strict=True):
        assert rel_err(g_ours, g_ref) <= 1e-5
    p = log_p.exp()
    assert stats.tokens == n
    assert stats.nll_sum == pytest.approx(-log_p.sum().item(), rel=1e-5)
    assert stats.prob_sum == pytest.approx(p.sum().item(), rel=1e-5)
    argmax = (h @ w.t() + (b if b is not None else 0.0)).argmax(1)
    assert stats.correct == float((argmax == y).sum()) and stats.correct >= 5
    expected_sum = -(p * log_p).sum() if mode == "dft" else -log_p.sum()
    assert stats.loss_sum == pytest.approx(expected_sum.item(), rel=1e-5)


def test_bf16_inputs_accumulate_in_fp32() -> None:
    """bf16 hidden states and weights: same result as fp32 math on the same (rounded) values."""
    torch.manual_seed(1)
    h = torch.randn(64, 16).bfloat16().requires_grad_()
    w = torch.randn(500, 16).bfloat16().requires_grad_()
    y = torch.randint(0, 500, (64,))
    loss, _ = fused_linear_cross_entropy(h, w, y, mode="dft", chunk_size=10)
    loss.backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16 and w.grad is not None
    assert loss.dtype == torch.float32
    ref, _ = naive_loss(h.detach().float(), w.detach().float(), None, y, "dft", 64.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_no_trained_tokens_is_a_connected_zero() -> None:
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    loss, stats = fused_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), normalizer=5)
    loss.backward()
    assert (
        loss.item() == 0.0 and stats.tokens == 0 and w.grad is not None and float(w.grad.abs().sum()) == 0.0
    )


def test_rejects_bad_arguments() -> None:
    h, w, y = torch.randn(4, 8), torch.randn(20, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="mode"):
        fused_linear_cross_entropy(h, w, y, mode="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes"):
        fused_linear_cross_entropy(h, torch.randn(20, 9), y)
    with pytest.raises(ValueError, match="normalizer"):
        fused_linear_cross_entropy(h, w, y, normalizer=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_matches_naive_on_cuda() -> None:
    torch.manual_seed(0)
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (300,), device="cuda")
    loss, _ = fused_linear_cross_entropy(h, w, y, mode="dft", chunk_size=64)
    loss.backward()
    ours = (h.grad.clone(), w.grad.clone())  # type: ignore[union-attr]
    h.grad = w.grad = None
    ref, _ = naive_loss(h, w, None, y, "dft", 300.0)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert rel_err(ours[0], h.grad) <= 1e-5 and rel_err(ours[1], w.grad) <= 1e-5  # type: ignore[arg-type]


# -- on a real model and padded, masked multi-sequence batches ----------------------------------


def _trainer(make_config: Callable[..., Any], mode: str) -> Trainer:
    trainer = Trainer(make_config(loss=mode, output_dir=make_config().output_dir.parent / f"run-{mode}"))
    trainer.setup()
    return trainer


def _param_grads(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["sft", "dft"])
def test_model_loss_matches_naive_and_trl(make_config: Callable[..., Any], tmp_path: Path, mode: str) -> None:
    """Ours vs (a) full logits through autograd and (b) TRL's SFTTrainer.compute_loss with
    loss_type='dft' (or 'nll'): same loss and same gradient for every parameter, to 1e-5."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    trainer = _trainer(make_config, mode)
    examples = trainer.train_data.examples
    # 6 sequences of different lengths, right-padded, with masked prompts and weight-0 turns
    (batch,) = micro_batches(examples, list(range(6)), 1, trainer.pad_id)
    assert batch.n_processed > batch.n_real  # there is padding
    model = trainer.model
    reference = copy.deepcopy(model)
    trl_model = copy.deepcopy(model)

    loss, stats = trainer.forward_loss(batch, normalizer=batch.n_trained)
    loss.backward()
    ours = _param_grads(model)

    # (a) naive: the model's own full logits
    logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.trained[:, 1:]
    log_p = torch.log_softmax(logits.float(), -1).gather(2, batch.input_ids[:, 1:, None]).squeeze(2)[targets]
    weight = log_p.exp().detach() if mode == "dft" else torch.ones_like(log_p)
    naive = -(weight * log_p).sum() / targets.sum()
    naive.backward()
    naive_grads = _param_grads(reference)

    # (b) TRL: its SFTTrainer computes the loss through its fused LM head
    labels = torch.where(batch.trained, batch.input_ids, torch.full_like(batch.input_ids, -100))
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type="dft" if mode == "dft" else "nll",
        report_to="none",
        use_cpu=True,
        max_length=256,
    )
    dummy = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    sft = SFTTrainer(model=trl_model, args=args, train_dataset=dummy, processing_class=trainer.tokenizer)
    trl_loss = sft.compute_loss(
        sft.model, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}
    )
    trl_loss.backward()
    trl_grads = _param_grads(sft.model)

    assert stats.tokens == batch.n_trained > 0
    for name, value in (("naive", naive), ("trl", trl_loss)):
        assert abs(loss.item() - value.item()) <= 1e-5 * abs(value.item()), name
    assert set(ours) == set(naive_grads) == set(trl_grads)
    for name, grad in ours.items():
        assert rel_err(grad, naive_grads[name]) <= 1e-5, name
        assert rel_err(grad, trl_grads[name]) <= 1e-5, name


def test_model_loss_does_not_depend_on_chunk_size(make_config: Callable[..., Any]) -> None:
    trainer = _trainer(make_config, "dft")
    (batch,) = micro_batches(trainer.train_data.examples, list(range(8)), 1, trainer.pad_id)
    results = []
    for chunk in (3, 50, 100_000):
        trainer.config = trainer.config.model_copy(update={"loss_chunk_size": chunk})
        trainer.model.zero_grad()
        loss, _ = trainer.forward_loss(batch, normalizer=100)
        loss.backward()
        results.append((loss.item(), _param_grads(trainer.model)))
    for loss_value, grads in results[1:]:
        assert loss_value == pytest.approx(results[0][0], rel=1e-6)
        for name, grad in grads.items():
            assert rel_err(grad, results[0][1][name]) <= 1e-5, name
