"""Fused, chunked linear cross-entropy for SFT and DFT.

The output projection and the loss are computed together, a chunk of trained tokens at a time,
so the full `[n, V]` logits never exist: the extra memory is one `[chunk, V]` fp32 tile plus the
gradients themselves. The gradients are computed in the forward pass from their closed form
(design.md, "The method: DFT"):

    dL/dz_t = w_t * (softmax(z_t) - onehot(y_t)) / N,   w_t = 1 (SFT) or sg(p_t) (DFT)

so forward + backward costs the three `[n, d] x [d, V]`-sized matrix products the gradient
needs and no recomputation. The one-hot is subtracted from the softmax tile in place (one entry
per row), and the scale `c = w / N` is folded into the small `[c, d]` operands of the products
instead of a pass over the `[c, V]` tile:

    G = softmax(z) - onehot(y)          grad_h = c ⊙ (G @ W)          grad_W = G^T @ (c ⊙ h)

All arithmetic is fp32 whatever the input dtype (bf16 hidden states under autocast, say), so
sums over long sequences do not lose precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

LossMode = Literal["sft", "dft"]

# Number of statistics returned per call, in this order (see LossStats).
_N_STATS = 5


@dataclass(frozen=True)
class LossStats:
    """Sums over the trained tokens of one call; add them across micro-batches, divide at the end."""

    loss_sum: float  # sum of the objective's per-token terms: w_t * -log p_t
    nll_sum: float  # sum of -log p_t (plain NLL, whatever the mode)
    prob_sum: float  # sum of p_t (mean target probability = prob_sum / tokens)
    correct: float  # tokens whose argmax prediction is the target
    tokens: float  # number of trained tokens

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> LossStats:
        values = t.detach().double().cpu().tolist()
        return cls(*values)

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(
            self.loss_sum + other.loss_sum,
            self.nll_sum + other.nll_sum,
            self.prob_sum + other.prob_sum,
            self.correct + other.correct,
            self.tokens + other.tokens,
        )

    @classmethod
    def zero(cls) -> LossStats:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and exact gradients of `-(1/N) sum_t w_t log softmax(h_t W^T + b)[y_t]`."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # [n, d] final hidden states of the trained positions
        weight: torch.Tensor,  # [V, d] output projection
        bias: torch.Tensor | None,  # [V] or None
        targets: torch.Tensor,  # [n] int64 next-token ids
        dft: bool,
        normalizer: float,  # N: trained tokens of the whole optimizer step
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = hidden.shape
        vocab = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        device = hidden.device
        f32 = torch.float32

        # fp32 views of the projection: a no-op for fp32 weights; O(V*d), never O(n*V), otherwise.
        w32 = weight if weight.dtype == f32 else weight.to(f32)
        b32 = None if bias is None else bias.to(f32)
        grad_h = torch.empty((n, d), dtype=f32, device=device) if need_h else None
        grad_w = torch.zeros((vocab, d), dtype=f32, device=device) if need_w else None
        grad_b = torch.zeros((vocab,), dtype=f32, device=device) if need_b else None
        stats = torch.zeros(_N_STATS, dtype=torch.float64, device=device)

        # Under autocast the products below would silently run in bf16: this function is fp32 inside.
        with torch.autocast(device_type=device.type, enabled=False):
            _chunked_forward(
                hidden, w32, b32, targets, dft, normalizer, chunk_size, stats, grad_h, grad_w, grad_b
            )

        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(stats)
        loss = (stats[0] / normalizer).to(f32)
        return loss, stats

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_stats: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        grads: list[torch.Tensor | None] = []
        for tensor, has, dtype in zip(saved, ctx.has, ctx.dtypes, strict=True):
            if not has:
                grads.append(None)
                continue
            # The loss is usually the root of the graph (grad 1): hand the buffers over without a copy.
            if not bool(torch.all(grad_loss == 1)):
                tensor = tensor * grad_loss
            grads.append(tensor.to(dtype))
        return grads[0], grads[1], grads[2], None, None, None, None


def _chunked_forward(
    hidden: torch.Tensor,
    w32: torch.Tensor,
    b32: torch.Tensor | None,
    targets: torch.Tensor,
    dft: bool,
    normalizer: float,
    chunk_size: int,
    stats: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
) -> None:
    """The chunk loop: adds to `stats` (LossStats order) and fills the gradient buffers given."""
    n = hidden.shape[0]
    vocab = w32.shape[0]
    device = hidden.device
    f32 = torch.float32
    need_grad = grad_h is not None or grad_w is not None or grad_b is not None
    c_max = max(1, min(chunk_size, n))
    # The one [c, V] tile: logits, then (in place) probabilities, then softmax - onehot.
    tile_buf = torch.empty((c_max, vocab), dtype=f32, device=device)
    for start in range(0, n, c_max):
        end = min(start + c_max, n)
        rows = end - start
        h = hidden[start:end].to(f32)  # [c, d]
        y = targets[start:end]  # [c]
        z = tile_buf[:rows]
        torch.mm(h, w32.t(), out=z)  # [c, V] logits
        if b32 is not None:
            z.add_(b32)
        z_y = z.gather(1, y[:, None]).squeeze(1)  # [c] target logits
        z_max, argmax = z.max(dim=1)  # [c], [c]
        # softmax in place, one cache-friendly pass per row (a row is read in full before it is written)
        p = torch._softmax(z, 1, False, out=z)  # [c, V] probabilities
        # log-sum-exp without another pass over the tile: softmax at the argmax is 1/sum(exp(z - max)),
        # which is >= 1/V, so its log is exact where log(p_y) could underflow.
        p_max = p.gather(1, argmax[:, None]).squeeze(1)
        log_p_y = z_y - z_max + torch.log(p_max)  # [c]
        p_y = torch.exp(log_p_y)
        w_t = p_y if dft else torch.ones_like(p_y)  # DFT weight: the target probability, no gradient
        stats += torch.stack(
            (
                -(w_t * log_p_y).sum(),
                -log_p_y.sum(),
                p_y.sum(),
                (argmax == y).sum().to(f32),
                torch.tensor(float(rows), device=device),
            )
        ).double()
        if not need_grad:
            continue
        # softmax - onehot, in place: c entries of the tile, not a pass over it
        rows_idx = torch.arange(rows, device=device)
        p[rows_idx, y] -= 1.0
        coef = (w_t / normalizer)[:, None]  # [c, 1]
        if grad_h is not None:
            g = grad_h[start:end]
            torch.mm(p, w32, out=g)  # [c, d]
            g.mul_(coef)
        if grad_w is not None:
            grad_w.addmm_(p.t(), coef * h)  # [V, d]
        if grad_b is not None:
            grad_b.addmv_(p.t(), coef.squeeze(1))  # [V]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mode: LossMode = "dft",
    normalizer: float | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, LossStats]:
    """The SFT or DFT objective of the trained positions, and its statistics.

    hidden:     [n, d] final hidden states of the positions whose next token is trained
    weight:     [V, d] output projection (lm_head.weight); bias: [V] or None
    targets:    [n] the next-token ids
    normalizer: N, the trained-token count of the whole optimizer step (defaults to n), so that
                accumulating micro-batches gives the same gradient as one big batch
    chunk_size: tokens per chunk; the extra memory is one chunk_size x V fp32 tile (200 MB at 1024
                tokens and SmolLM2's 49152 vocabulary) plus the gradients

    Returns the scalar loss (differentiable w.r.t. hidden, weight and bias) and the sums of
    LossStats over these n tokens.
    """
    if mode not in ("sft", "dft"):
        raise ValueError(f"mode: expected 'sft' or 'dft', got {mode!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shapes: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"shapes: targets {tuple(targets.shape)} for {hidden.shape[0]} hidden states")
    n = hidden.shape[0]
    norm = float(n if normalizer is None else normalizer)
    if n == 0:
        # No trained token in this micro-batch: a zero that still connects to the graph.
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero.float(), LossStats.zero()
    if norm <= 0:
        raise ValueError(f"normalizer must be positive, got {norm}")
    loss, stats = _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, targets.long(), mode == "dft", norm, int(chunk_size)
    )
    return loss, LossStats.from_tensor(stats)
