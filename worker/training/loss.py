"""Fused, chunked linear cross-entropy for SFT and DFT.

The output projection and the loss are computed together, a chunk of trained tokens at a time,
so the full `[n, V]` logits never exist: the extra memory is one `[chunk, V]` fp32 tile (two with
a soft-cap and gradients) plus the gradients themselves. The logits are those of the model's head:

    raw_t = h_t W^T + b + u_t B^T                  (u B^T: a LoRA pair on the projection, optional)
    z_t   = softcap(s * raw_t),  softcap(x) = cap * tanh(x / cap)  (the identity without a cap)

with s the head's logit scale (Cohere's `logit_scale`, 1 / Granite's `logits_scaling`) and cap its
soft-cap (Gemma-2/3's `final_logit_softcapping`, RecurrentGemma's `logits_soft_cap`). The gradients
are computed in the forward pass from their closed form (design.md, "The method: DFT"):

    dL/dz_t   = w_t * (softmax(z_t) - onehot(y_t)) / N,   w_t = 1 (SFT) or sg(p_t) (DFT)
    dL/draw_t = dL/dz_t ⊙ s (1 - tanh²(s raw_t / cap))    (⊙ s alone without a cap)

so forward + backward costs the three `[n, d] x [d, V]`-sized matrix products the gradient needs
and no recomputation. The one-hot is subtracted from the softmax tile in place (one entry per row),
the cap's factor is one in-place product with the second tile, and the per-row scale `c = w s / N`
is folded into the small `[c, d]` and `[c, r]` operands instead of a pass over the `[c, V]` tile:

    G = (softmax(z) - onehot(y)) ⊙ (1 - tanh²)       grad_h = c ⊙ (G @ W)    grad_W = G^T @ (c ⊙ h)
    grad_b = G^T c                                   grad_u = c ⊙ (G @ B)    grad_B = G^T @ (c ⊙ u)

The softmax tile and the statistics are fp32 whatever the input dtype, so sums over long sequences
do not lose precision. The products are fp32 too (inputs upcast; W's upcast is O(V*d), never
O(n*V)), except on CUDA with bf16 (or fp16) hidden states and weight: there the three big products
take those inputs as they are, accumulate in fp32 and write fp32 (`torch.mm(..., out_dtype=float32)`),
so no fp32 copy of W is made and tensor cores are used; G is rounded to that dtype for the two
gradient products (one more `[chunk, V]` buffer of half a tile). The LoRA products (rank r) stay fp32.

With grad mode off (`torch.no_grad()`, `torch.inference_mode()`: evaluation) or no input requiring
a gradient, no gradient buffer is allocated and no autograd.Function runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from worker.training.loss_chunks import F32, Spec, fused

LossMode = Literal["sft", "dft"]


@dataclass(frozen=True)
class LossStats:
    """Sums over the trained tokens of one call; add them across micro-batches, divide at the end."""

    loss_sum: float  # sum of the objective's per-token terms: w_t * -log p_t
    nll_sum: float  # sum of -log p_t (plain NLL, whatever the mode)
    prob_sum: float  # sum of p_t (mean target probability = prob_sum / tokens)
    correct: float  # tokens whose argmax prediction (of the transformed logits) is the target
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


def allow_tf32() -> None:
    """Let fp32 matrix products on CUDA use TF32 tensor cores (the trainer calls it for CUDA jobs).

    `torch.set_float32_matmul_precision("high")` rather than the two `allow_tf32` flags: it is the
    documented, backend-neutral switch (the one torch.compile asks for), it does not mix the legacy
    flags with the per-backend `fp32_precision` settings that newer torch prefers, and the flag it
    leaves alone, `torch.backends.cudnn.allow_tf32`, is already true by default and only concerns
    convolutions. It is process-wide: tests that need exact fp32 products set "highest" back.
    """
    torch.set_float32_matmul_precision("high")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and exact gradients of `-(1/N) sum_t w_t log softmax(z_t)[y_t]` (z as in the module doc)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # [n, d] final hidden states of the trained positions
        weight: torch.Tensor,  # [V, d] output projection
        bias: torch.Tensor | None,  # [V] or None
        lora_u: torch.Tensor | None,  # [n, r] or None
        lora_b: torch.Tensor | None,  # [V, r] or None
        targets: torch.Tensor,  # [n] int64 next-token ids
        spec: Spec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lora = None if lora_u is None or lora_b is None else (lora_u, lora_b)
        stats, grads = fused(hidden, weight, bias, lora, targets, spec, tuple(ctx.needs_input_grad[:5]))
        buffers = grads.all()
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in buffers))
        ctx.has = tuple(t is not None for t in buffers)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias, lora_u, lora_b))
        ctx.mark_non_differentiable(stats)
        loss = (stats[0] / spec.normalizer).to(F32)
        return loss, stats

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_stats: torch.Tensor) -> tuple[Any, ...]:
        grads: list[torch.Tensor | None] = []
        for tensor, has, dtype in zip(ctx.saved_tensors, ctx.has, ctx.dtypes, strict=True):
            if not has:
                grads.append(None)
                continue
            # The loss is usually the root of the graph (grad 1): hand the buffers over without a copy.
            if not bool(torch.all(grad_loss == 1)):
                tensor = tensor * grad_loss
            grads.append(tensor.to(dtype))
        return *grads, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mode: LossMode = "dft",
    normalizer: float | None = None,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    lora: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The SFT or DFT objective of the trained positions, and its statistics.

    hidden:      [n, d] final hidden states of the positions whose next token is trained
    weight:      [V, d] output projection (lm_head.weight, or a LoRA layer's base weight); bias: [V] or None
    targets:     [n] the next-token ids
    normalizer:  N, the trained-token count of the whole optimizer step (defaults to n), so that
                 accumulating micro-batches gives the same gradient as one big batch
    chunk_size:  tokens per chunk; the extra memory is one chunk_size x V fp32 tile (200 MB at 1024
                 tokens and SmolLM2's 49152 vocabulary), two with a soft-cap, plus the gradients
    logit_scale: s, multiplies the logits (Cohere's logit_scale; 1 / Granite's logits_scaling)
    softcap:     cap, logits = cap * tanh(s * raw / cap) (Gemma-2/3, RecurrentGemma); None: no cap
    lora:        (u [n, r], B [V, r]): u B^T is added to the raw logits (u = scaling * A(dropout(h)),
                 computed by the caller with ordinary autograd; B = lora_B.weight)

    Returns the scalar loss (differentiable w.r.t. hidden, weight, bias, u and B, for those that
    require a gradient) and the sums of LossStats over these n tokens, of the transformed logits.
    """
    if mode not in ("sft", "dft"):
        raise ValueError(f"mode: expected 'sft' or 'dft', got {mode!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shapes: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"shapes: targets {tuple(targets.shape)} for {hidden.shape[0]} hidden states")
    _check_head(hidden, weight, logit_scale, softcap, lora)
    n = hidden.shape[0]
    norm = float(n if normalizer is None else normalizer)
    inputs = (hidden, weight, bias, *(lora or (None, None)))
    if n == 0:
        # No trained token in this micro-batch: a zero that still connects to the graph.
        zero = sum((t.sum() * 0.0 for t in inputs if t is not None), torch.zeros((), device=hidden.device))
        return zero.float(), LossStats.zero()
    if norm <= 0:
        raise ValueError(f"normalizer must be positive, got {norm}")
    spec = Spec(mode == "dft", norm, int(chunk_size), float(logit_scale), softcap)
    needs = tuple(t is not None and t.requires_grad for t in inputs)
    if not torch.is_grad_enabled() or not any(needs):
        # Evaluation: no gradient buffer, no autograd node.
        stats, _ = fused(hidden, weight, bias, lora, targets.long(), spec, (False,) * 5)
        return (stats[0] / norm).to(F32), LossStats.from_tensor(stats)
    loss, stats = _FusedLinearCrossEntropy.apply(*inputs, targets.long(), spec)
    return loss, LossStats.from_tensor(stats)


def _check_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
    lora: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    if not math.isfinite(logit_scale) or logit_scale == 0:
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if lora is None:
        return
    u, b = lora
    if (
        u.dim() != 2
        or b.dim() != 2
        or u.shape[0] != hidden.shape[0]
        or b.shape != (weight.shape[0], u.shape[1])
    ):
        raise ValueError(
            f"lora: u {tuple(u.shape)} and B {tuple(b.shape)} do not fit hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)} (expected u [n, r] and B [V, r])"
        )
