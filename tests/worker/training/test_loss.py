"""The fused loss equals the published formula and TRL's DFT, value and gradients, to 1e-5: plain,
scaled and soft-capped heads, LoRA on the output projection; evaluation allocates no gradient
buffer; on CUDA, bf16/fp16 inputs take reduced-precision products with fp32 accumulation."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from worker.training import loss_chunks
from worker.training.data import micro_batches
from worker.training.loss import LossMode, allow_tf32, fused_linear_cross_entropy
from worker.training.trainer import Trainer

# (logit_scale, softcap): Gemma-2/3 and RecurrentGemma caps, Cohere's scale, Granite's 1/scaling, both
HEADS = [(1.0, 30.0), (1.0, 5.0), (0.0625, None), (2.0, None), (2.0, 5.0), (0.0625, 30.0)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-300))


def naive_loss(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    y: torch.Tensor,
    mode: str,
    n: float,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    lora: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's formula on full float64 logits softcap(scale * (h W^T + b + u B^T)):
    -(1/N) sum sg(p) log p, or plain mean NLL for SFT. Returns (loss, log p_t [n], logits [n, V])."""
    raw = h.double() @ w.double().t()
    if b is not None:
        raw = raw + b.double()
    if lora is not None:
        raw = raw + lora[0].double() @ lora[1].double().t()
    logits = scale * raw
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_p = torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)
    weight = log_p.exp().detach() if mode == "dft" else torch.ones_like(log_p)
    return -(weight * log_p).sum() / n, log_p, logits


def take_grads(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """The gradients of the tensors that have one, cleared for the next backward."""
    grads = []
    for t in tensors:
        if t is not None and t.grad is not None:
            grads.append(t.grad.clone())
            t.grad = None
    return grads


def check_stats(stats: Any, mode: str, log_p: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Statistics of the transformed logits; `correct` exact except on rows whose top two logits
    are closer than fp32 can tell (a saturated soft-cap)."""
    p = log_p.exp()
    assert stats.tokens == len(y)
    assert stats.nll_sum == pytest.approx(-log_p.sum().item(), rel=1e-5)
    assert stats.prob_sum == pytest.approx(p.sum().item(), rel=1e-5)
    expected_sum = -(p * log_p).sum() if mode == "dft" else -log_p.sum()
    assert stats.loss_sum == pytest.approx(expected_sum.item(), rel=1e-5)
    top2 = logits.detach().topk(2, dim=1).values
    near_ties = int(((top2[:, 0] - top2[:, 1]) <= 1e-5 * top2[:, 0].abs().clamp(min=1)).sum())
    expected_correct = float((logits.argmax(1) == y).sum())
    assert abs(stats.correct - expected_correct) <= near_ties and stats.correct >= 5 - near_ties


class Allocations(TorchDispatchMode):
    """Records (shape, dtype) of each tensor an op creates: not views, not `out=` results."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.created.append((tuple(t.shape), t.dtype))
        return out

    @property
    def shapes(self) -> set[tuple[int, ...]]:
        return {shape for shape, _ in self.created}


@pytest.fixture
def exact_fp32_matmul() -> Iterator[None]:
    """fp32 products in fp32 (not TF32) for this test, whatever allow_tf32() did before."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


# -- plain heads ---------------------------------------------------------------------------------


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
    ours = take_grads(h, w, b)
    ref, log_p, logits = naive_loss(h, w, b, y, mode, normalizer)
    (2.5 * ref).backward()
    theirs = take_grads(h, w, b)

    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert len(ours) == len(theirs) == (3 if bias else 2)
    for g_ours, g_ref in zip(ours, theirs, strict=True):
        assert rel_err(g_ours, g_ref) <= 1e-5
    check_stats(stats, mode, log_p, logits, y)


def test_bf16_inputs_accumulate_in_fp32() -> None:
    """bf16 hidden states and weights on the CPU: same result as fp32 math on the same (rounded) values."""
    torch.manual_seed(1)
    h = torch.randn(64, 16).bfloat16().requires_grad_()
    w = torch.randn(500, 16).bfloat16().requires_grad_()
    y = torch.randint(0, 500, (64,))
    loss, _ = fused_linear_cross_entropy(h, w, y, mode="dft", chunk_size=10)
    loss.backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16 and w.grad is not None
    assert loss.dtype == torch.float32
    ref, _, _ = naive_loss(h.detach().float(), w.detach().float(), None, y, "dft", 64.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


# -- scaled and soft-capped heads -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sft", "dft"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize(("scale", "softcap"), HEADS)
def test_transformed_head_matches_naive_formula(
    mode: LossMode, bias: bool, chunk_size: int, scale: float, softcap: float | None
) -> None:
    """z = softcap(scale * (h W^T + b)): loss, gradients and statistics, against float64."""
    torch.manual_seed(2)
    n, d, vocab, normalizer = 150, 24, 333, 411.0
    h = torch.randn(n, d, requires_grad=True)
    # raw logits ~15 under a cap, so that it bites; else scaled logits ~2.4, as in a trained model's head
    w = (torch.randn(vocab, d) * (3.0 if softcap else 0.5 / scale)).requires_grad_()
    b = torch.randn(vocab, requires_grad=True) if bias else None
    y = torch.randint(0, vocab, (n,))
    with torch.no_grad():
        y[:5] = naive_loss(h, w, b, y, mode, normalizer, scale=scale, softcap=softcap)[2][:5].argmax(1)

    loss, stats = fused_linear_cross_entropy(
        h,
        w,
        y,
        bias=b,
        mode=mode,
        normalizer=normalizer,
        chunk_size=chunk_size,
        logit_scale=scale,
        softcap=softcap,
    )
    (2.5 * loss).backward()
    ours = take_grads(h, w, b)
    ref, log_p, logits = naive_loss(h, w, b, y, mode, normalizer, scale=scale, softcap=softcap)
    (2.5 * ref).backward()
    theirs = take_grads(h, w, b)
    plain, _, _ = naive_loss(h, w, b, y, mode, normalizer)

    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert abs(plain.item() - ref.item()) > 1e-2 * abs(ref.item())  # the head's transform matters here
    assert len(ours) == len(theirs) == (3 if bias else 2)
    for g_ours, g_ref in zip(ours, theirs, strict=True):
        assert rel_err(g_ours, g_ref) <= 1e-5
    check_stats(stats, mode, log_p, logits, y)


# -- LoRA on the output projection ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sft", "dft"])
@pytest.mark.parametrize("frozen_base", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 4096])
@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (2.0, 5.0)])
def test_lora_on_the_head_matches_autograd(
    mode: LossMode, frozen_base: bool, chunk_size: int, scale: float, softcap: float | None
) -> None:
    """raw = h W^T + b + u B^T with u = s * h A^T: the gradients of h, u, A and B (and of W and b
    unless the base is frozen, when W gets none) equal autograd's on the float64 formula."""
    torch.manual_seed(3)
    n, d, vocab, r, s, normalizer = 120, 24, 333, 4, 2.0, 300.0
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(vocab, d) * 0.5).requires_grad_(not frozen_base)
    b = torch.randn(vocab).requires_grad_(not frozen_base)
    a = (torch.randn(r, d) * 0.3).requires_grad_()  # lora_A.weight
    lora_b = (torch.randn(vocab, r) * 0.3).requires_grad_()  # lora_B.weight
    y = torch.randint(0, vocab, (n,))

    u = s * h @ a.t()  # [n, r], as the trainer computes it (dropout aside)
    u.retain_grad()
    loss, stats = fused_linear_cross_entropy(
        h, w, y, bias=b, mode=mode, normalizer=normalizer, chunk_size=chunk_size,
        logit_scale=scale, softcap=softcap, lora=(u, lora_b),
    )  # fmt: skip
    (2.5 * loss).backward()
    ours = take_grads(h, u, a, lora_b, w, b)
    u_ref = s * h @ a.t()
    u_ref.retain_grad()
    ref, log_p, logits = naive_loss(
        h, w, b, y, mode, normalizer, scale=scale, softcap=softcap, lora=(u_ref, lora_b)
    )
    (2.5 * ref).backward()
    theirs = take_grads(h, u_ref, a, lora_b, w, b)

    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert len(ours) == len(theirs) == (4 if frozen_base else 6)
    assert (w.grad is None and b.grad is None) if frozen_base else True
    for name, g_ours, g_ref in zip(["h", "u", "A", "B", "W", "b"], ours, theirs, strict=False):
        assert rel_err(g_ours, g_ref) <= 1e-5, name
    p = log_p.exp()
    assert stats.prob_sum == pytest.approx(p.sum().item(), rel=1e-5)
    assert stats.correct == float((logits.argmax(1) == y).sum())


# -- no gradient buffers when grad mode is off ----------------------------------------------------


def test_no_gradient_buffer_without_grad_mode() -> None:
    """Under no_grad / inference_mode, with every input requiring a gradient, no [V, d], [n, d],
    [V], [V, r] or [n, r] tensor is created and no autograd node is made; with grad on (the
    control: the check can fail) the buffers are there; a frozen weight gets no [V, d] buffer."""
    torch.manual_seed(4)
    n, d, vocab, r, chunk = 40, 12, 50, 3, 16
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(vocab, d, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True)
    u = torch.randn(n, r, requires_grad=True)
    lora_b = torch.randn(vocab, r, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    buffers = {(vocab, d), (n, d), (vocab,), (vocab, r), (n, r)}

    def run(weight: torch.Tensor) -> tuple[torch.Tensor, set[tuple[int, ...]]]:
        with Allocations() as allocations:
            loss, _ = fused_linear_cross_entropy(
                h, weight, y, bias=b, chunk_size=chunk, softcap=5.0, logit_scale=2.0, lora=(u, lora_b)
            )
        return loss, allocations.shapes

    with torch.no_grad():
        loss, shapes = run(w)
    assert not shapes & buffers and loss.grad_fn is None
    with torch.inference_mode():
        inference_loss, shapes = run(w)
    assert not shapes & buffers and inference_loss.grad_fn is None

    grad_loss, shapes = run(w)
    assert buffers <= shapes and grad_loss.grad_fn is not None
    assert grad_loss.item() == pytest.approx(loss.item(), rel=1e-6) == inference_loss.item()
    _, shapes = run(w.detach())  # a frozen LoRA base
    assert (vocab, d) not in shapes and (n, d) in shapes


# -- the products on GPUs: bf16/fp16 inputs, fp32 accumulation ----------------------------------


class EmulatedReduced(loss_chunks.Products):
    """The reduced-precision products emulated on the CPU (aten::mm.dtype is CUDA-only): checks
    that every operand arrives in the reduced dtype (so no fp32 copy of W) and the output is fp32."""

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        assert a.dtype == b.dtype == self.dtype and out.dtype == torch.float32
        torch.mm(a.float(), b.float(), out=out)

    def addmm_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
        assert a.dtype == b.dtype == self.dtype and acc.dtype == torch.float32
        if self.accumulate:
            acc.addmm_(a.float(), b.float(), alpha=alpha)
        else:
            acc.add_(torch.mm(a.float(), b.float()), alpha=alpha)


def check_reduced_precision(
    device: str, dtype: torch.dtype, scale: float, softcap: float | None, lora: bool
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """bf16/fp16 inputs against the float64 formula on the same rounded values: loss to 2e-2,
    gradients (h, W, b, u, B) with a cosine similarity above 0.999. Returns the tensors the fused
    loss created, (shape, dtype) each."""
    torch.manual_seed(5)
    n, d, vocab, r = 300, 64, 1000, 8
    h = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, device=device) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(vocab, device=device) * 0.1).to(dtype).requires_grad_()
    u = (torch.randn(n, r, device=device) * 0.3).to(dtype).requires_grad_() if lora else None
    lora_b = (torch.randn(vocab, r, device=device) * 0.3).requires_grad_() if lora else None  # fp32, as PEFT
    pair = (u, lora_b) if u is not None and lora_b is not None else None
    y = torch.randint(0, vocab, (n,), device=device)
    with Allocations() as allocations:  # the fused loss's own, forward and backward
        loss, _ = fused_linear_cross_entropy(
            h, w, y, bias=b, mode="dft", chunk_size=64, logit_scale=scale, softcap=softcap, lora=pair
        )
        loss.backward()
    ours = take_grads(h, w, b, u, lora_b)
    assert [g.dtype for g in ours[:3]] == [dtype] * 3
    ref, _, _ = naive_loss(h, w, b, y, "dft", float(n), scale=scale, softcap=softcap, lora=pair)
    ref.backward()
    theirs = take_grads(h, w, b, u, lora_b)
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())
    assert len(ours) == len(theirs) == (5 if lora else 3)
    for name, g_ours, g_ref in zip(["h", "W", "b", "u", "B"], ours, theirs, strict=False):
        assert cosine(g_ours, g_ref) > 0.999, name
    return allocations.created


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize(("scale", "softcap", "lora"), [(1.0, None, False), (2.0, 5.0, True)])
def test_reduced_precision_path_emulated_on_cpu(
    monkeypatch: pytest.MonkeyPatch, accumulate: bool, scale: float, softcap: float | None, lora: bool
) -> None:
    """The bookkeeping of the CUDA bf16 path (G rounded to bf16, 1/N as the product's alpha, the
    LoRA products in fp32), with its products emulated: the real ones run in test_cuda_reduced_*."""
    monkeypatch.setattr(loss_chunks, "products_for", lambda h, w: EmulatedReduced(torch.bfloat16, accumulate))
    check_reduced_precision("cpu", torch.bfloat16, scale, softcap, lora)


def test_the_cpu_keeps_fp32_products() -> None:
    """On the CPU, bf16 inputs take the fp32 path (aten::mm.dtype raises there: detected, not used)."""
    h, w = torch.randn(4, 8).bfloat16(), torch.randn(20, 8).bfloat16()
    assert loss_chunks.products_for(h, w).dtype == torch.float32
    assert loss_chunks._out_dtype_support("cpu", torch.bfloat16) == (False, False)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("scale", "softcap", "lora"), [(1.0, None, False), (2.0, 5.0, True)])
def test_cuda_reduced_precision_matches_float64(
    dtype: torch.dtype, scale: float, softcap: float | None, lora: bool
) -> None:
    """On CUDA, bf16/fp16 inputs take the reduced-precision products, and W is never copied to fp32."""
    probe = torch.zeros(1, 1, device="cuda", dtype=dtype)
    products = loss_chunks.products_for(probe, probe)
    assert products.dtype == dtype  # this torch has aten::mm.dtype on CUDA
    created = check_reduced_precision("cuda", dtype, scale, softcap, lora)
    fp32_vd = [shape for shape, dt in created if shape == (1000, 64) and dt == torch.float32]
    if products.accumulate:  # grad_W only: no fp32 copy of W, no per-chunk temporary
        assert len(fp32_vd) == 1


@needs_cuda
def test_matches_naive_on_cuda(exact_fp32_matmul: None) -> None:
    torch.manual_seed(0)
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (300,), device="cuda")
    loss, _ = fused_linear_cross_entropy(h, w, y, mode="dft", chunk_size=64, softcap=30.0)
    loss.backward()
    ours = take_grads(h, w)
    ref, _, _ = naive_loss(h, w, None, y, "dft", 300.0, softcap=30.0)
    ref.backward()
    theirs = take_grads(h, w)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert rel_err(ours[0], theirs[0]) <= 1e-5 and rel_err(ours[1], theirs[1]) <= 1e-5


def test_allow_tf32_sets_high_fp32_matmul_precision() -> None:
    previous = torch.get_float32_matmul_precision()
    try:
        allow_tf32()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(previous)


# -- edge cases ----------------------------------------------------------------------------------


def test_no_trained_tokens_is_a_connected_zero() -> None:
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    a = torch.randn(2, 8, requires_grad=True)
    lora_b = torch.randn(20, 2, requires_grad=True)
    loss, stats = fused_linear_cross_entropy(
        h, w, torch.zeros(0, dtype=torch.long), normalizer=5, lora=(h @ a.t(), lora_b)
    )
    loss.backward()
    assert loss.item() == 0.0 and stats.tokens == 0
    for t in (w, a, lora_b):
        assert t.grad is not None and float(t.grad.abs().sum()) == 0.0


def test_rejects_bad_arguments() -> None:
    h, w, y = torch.randn(4, 8), torch.randn(20, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="mode"):
        fused_linear_cross_entropy(h, w, y, mode="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes"):
        fused_linear_cross_entropy(h, torch.randn(20, 9), y)
    with pytest.raises(ValueError, match="normalizer"):
        fused_linear_cross_entropy(h, w, y, normalizer=0)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_cross_entropy(h, w, y, softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        fused_linear_cross_entropy(h, w, y, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="lora"):
        fused_linear_cross_entropy(h, w, y, lora=(torch.randn(4, 2), torch.randn(20, 3)))
    with pytest.raises(ValueError, match="lora"):
        fused_linear_cross_entropy(h, w, y, lora=(torch.randn(5, 2), torch.randn(20, 2)))


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
    (batch,) = micro_batches(examples, list(range(6)), 6, trainer.pad_id)
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
    sft = SFTTrainer(
        model=cast(Any, trl_model), args=args, train_dataset=dummy, processing_class=trainer.tokenizer
    )
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
    (batch,) = micro_batches(trainer.train_data.examples, list(range(8)), 8, trainer.pad_id)
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
