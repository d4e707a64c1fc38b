"""The chunk loop of the fused loss (worker/training/loss.py has the formulas) and the dispatch of
its three big matrix products: fp32, or bf16/fp16 inputs with fp32 accumulation on CUDA."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

F32 = torch.float32
N_STATS = 5  # statistics per call, in LossStats order


class Products:
    """How the chunk loop multiplies by W (and accumulates grad_W): inputs in `dtype`, output fp32."""

    def __init__(self, dtype: torch.dtype = F32, accumulate: bool = True) -> None:
        self.dtype = dtype  # dtype of the products' inputs; their output is always fp32
        self.accumulate = accumulate  # reduced inputs: addmm adds into grad_W in place (else a temporary)

    @property
    def reduced(self) -> bool:
        return self.dtype != F32

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        """out (fp32) = a @ b."""
        if self.reduced:
            torch.mm(a, b, out_dtype=F32, out=out)
        else:
            torch.mm(a, b, out=out)

    def addmm_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
        """acc (fp32) += alpha * a @ b."""
        if not self.reduced:
            acc.addmm_(a, b, alpha=alpha)
        elif self.accumulate:
            torch.addmm(acc, a, b, out_dtype=F32, alpha=alpha, out=acc)
        else:
            acc.add_(torch.mm(a, b, out_dtype=F32), alpha=alpha)


def products_for(hidden: torch.Tensor, weight: torch.Tensor) -> Products:
    """The dispatch: reduced-precision inputs only on CUDA, for bf16/fp16 hidden states and weight
    of one dtype, where this torch supports it; fp32 products (today's exact path) otherwise."""
    dtype = weight.dtype
    if hidden.device.type != "cuda" or hidden.dtype != dtype or dtype not in (torch.bfloat16, torch.float16):
        return Products()
    mm, addmm = _out_dtype_support(hidden.device.type, dtype)
    return Products(dtype, accumulate=addmm) if mm else Products()


@functools.cache
def _out_dtype_support(device_type: str, dtype: torch.dtype) -> tuple[bool, bool]:
    """Whether `torch.mm(a, b, out_dtype=float32, out=...)` (aten::mm.dtype_out) and the in-place
    `torch.addmm(acc, a, b, out_dtype=float32, out=acc)` with an fp32 `acc` work for `dtype` inputs
    on this device type; checked once, on tiny operands with exact results."""
    try:
        a = torch.ones((3, 2), dtype=dtype, device=device_type)
        out = torch.empty((3, 3), dtype=F32, device=device_type)
        torch.mm(a, a.t(), out_dtype=F32, out=out)  # every entry 2
        if not bool((out == 2).all()):
            return False, False
    except (RuntimeError, TypeError):  # NotImplementedError (CPU) is a RuntimeError
        return False, False
    try:
        torch.addmm(out, a, a.t(), out_dtype=F32, alpha=0.5, out=out)  # 2 + 0.5 * 2
        return True, bool((out == 3).all())
    except (RuntimeError, TypeError):
        return True, False


@dataclass(frozen=True)
class Spec:
    """Everything a call computes but the tensors."""

    dft: bool
    normalizer: float  # N: trained tokens of the whole optimizer step
    chunk_size: int
    logit_scale: float  # s
    softcap: float | None  # cap


@dataclass
class Grads:
    """fp32 gradient buffers filled by the chunk loop; None where no gradient is wanted."""

    h: torch.Tensor | None = None  # [n, d]
    w: torch.Tensor | None = None  # [V, d]
    b: torch.Tensor | None = None  # [V]
    u: torch.Tensor | None = None  # [n, r]
    lora_b: torch.Tensor | None = None  # [V, r]

    def all(self) -> tuple[torch.Tensor | None, ...]:
        return self.h, self.w, self.b, self.u, self.lora_b


def fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: tuple[torch.Tensor, torch.Tensor] | None,
    targets: torch.Tensor,
    spec: Spec,
    needs: tuple[bool, ...],  # gradient wanted for (hidden, weight, bias, u, B)
) -> tuple[torch.Tensor, Grads]:
    """The statistics (float64, LossStats order) and the gradient buffers `needs` asks for."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    products = products_for(hidden, weight)
    w_op = products.operand(weight)  # [V, d]: W itself (fp32, or bf16/fp16 on CUDA), else an fp32 copy
    b32 = None if bias is None else bias.to(F32)  # [V]
    u, lora_b32 = (None, None) if lora is None else (lora[0], lora[1].to(F32))  # [n, r], [V, r] fp32
    grads = Grads(
        h=torch.empty((n, d), dtype=F32, device=device) if needs[0] else None,
        w=torch.zeros((vocab, d), dtype=F32, device=device) if needs[1] else None,
        b=torch.zeros((vocab,), dtype=F32, device=device) if bias is not None and needs[2] else None,
        u=torch.empty(u.shape, dtype=F32, device=device) if u is not None and needs[3] else None,
        lora_b=torch.zeros_like(lora_b32) if lora_b32 is not None and needs[4] else None,
    )
    stats = torch.zeros(N_STATS, dtype=torch.float64, device=device)
    # Under autocast the products would silently run in bf16: this function chooses its precision itself.
    with torch.autocast(device_type=device.type, enabled=False):
        _chunk_loop(hidden, w_op, b32, u, lora_b32, targets, spec, products, stats, grads)
    return stats, grads


def _logits(
    h: torch.Tensor,  # [c, d] in the products' dtype
    w_op: torch.Tensor,  # [V, d] in the products' dtype
    b32: torch.Tensor | None,  # [V]
    u: torch.Tensor | None,  # [c, r] fp32
    lora_b32: torch.Tensor | None,  # [V, r] fp32
    spec: Spec,
    products: Products,
    z: torch.Tensor,  # [c, V] fp32, written: the transformed logits
    t: torch.Tensor | None,  # [c, V] fp32 or None; written with a soft-cap: tanh(s * raw / cap)
) -> None:
    products.mm(h, w_op.t(), out=z)  # [c, V] raw logits
    if b32 is not None:
        z.add_(b32)
    if u is not None and lora_b32 is not None:
        z.addmm_(u, lora_b32.t())  # + u B^T
    cap = spec.softcap
    if cap is None:
        if spec.logit_scale != 1.0:
            z.mul_(spec.logit_scale)
    elif t is None:  # no gradient wanted: the cap in place
        z.mul_(spec.logit_scale / cap).tanh_().mul_(cap)
    else:  # keep tanh for the cap's derivative
        torch.mul(z, spec.logit_scale / cap, out=t).tanh_()
        torch.mul(t, cap, out=z)


def _chunk_loop(
    hidden: torch.Tensor,  # [n, d]
    w_op: torch.Tensor,  # [V, d] in the products' dtype
    b32: torch.Tensor | None,  # [V]
    u: torch.Tensor | None,  # [n, r]
    lora_b32: torch.Tensor | None,  # [V, r]
    targets: torch.Tensor,  # [n]
    spec: Spec,
    products: Products,
    stats: torch.Tensor,
    grads: Grads,
) -> None:
    """The chunk loop: adds to `stats` (LossStats order) and fills the gradient buffers given."""
    n = hidden.shape[0]
    vocab = w_op.shape[0]
    device = hidden.device
    need_grad = any(g is not None for g in grads.all())
    c_max = max(1, min(spec.chunk_size, n))
    # The [c, V] tile: logits, then (in place) probabilities, then softmax - onehot.
    tile_buf = torch.empty((c_max, vocab), dtype=F32, device=device)
    # With a soft-cap and gradients only: a second fp32 tile keeps tanh for the cap's derivative.
    tanh_buf = torch.empty_like(tile_buf) if need_grad and spec.softcap is not None else None
    # With reduced-precision products and gradients only: G in their dtype (half a tile for bf16).
    g_buf = (
        torch.empty((c_max, vocab), dtype=products.dtype, device=device)
        if need_grad and products.reduced and (grads.h is not None or grads.w is not None)
        else None
    )
    for start in range(0, n, c_max):
        end = min(start + c_max, n)
        rows = end - start
        h = products.operand(hidden[start:end])  # [c, d]
        y = targets[start:end]  # [c]
        u_c = None if u is None else u[start:end].to(F32)  # [c, r]
        z = tile_buf[:rows]
        t = None if tanh_buf is None else tanh_buf[:rows]
        _logits(h, w_op, b32, u_c, lora_b32, spec, products, z, t)  # [c, V] transformed logits
        z_y = z.gather(1, y[:, None]).squeeze(1)  # [c] target logits
        z_max, argmax = z.max(dim=1)  # [c], [c]
        # softmax in place, one cache-friendly pass per row (a row is read in full before it is written)
        p = torch._softmax(z, 1, False, out=z)  # [c, V] probabilities
        # log-sum-exp without another pass over the tile: softmax at the argmax is 1/sum(exp(z - max)),
        # which is >= 1/V, so its log is exact where log(p_y) could underflow.
        p_max = p.gather(1, argmax[:, None]).squeeze(1)
        log_p_y = z_y - z_max + torch.log(p_max)  # [c]
        p_y = torch.exp(log_p_y)
        w_t = p_y if spec.dft else torch.ones_like(p_y)  # DFT weight: the target probability, no gradient
        stats += torch.stack(
            (
                -(w_t * log_p_y).sum(),
                -log_p_y.sum(),
                p_y.sum(),
                (argmax == y).sum().to(F32),
                torch.tensor(float(rows), device=device),
            )
        ).double()
        if not need_grad:
            continue
        # softmax - onehot, in place: c entries of the tile, not a pass over it
        rows_idx = torch.arange(rows, device=device)
        p[rows_idx, y] -= 1.0
        if t is not None:  # the soft-cap's derivative (its factor s goes into `row` below)
            p.mul_(t.mul_(t).neg_().add_(1.0))  # G ⊙ (1 - tanh²)
        row = w_t if spec.logit_scale == 1.0 else w_t * spec.logit_scale  # [c]: c = row / N
        coef = (row / spec.normalizer)[:, None]  # [c, 1]
        _add_gradients(h, u_c, lora_b32, w_op, p, g_buf, row, coef, spec, products, grads, start, end)


def _add_gradients(
    h: torch.Tensor,  # [c, d] in the products' dtype
    u_c: torch.Tensor | None,  # [c, r] fp32
    lora_b32: torch.Tensor | None,  # [V, r] fp32
    w_op: torch.Tensor,  # [V, d] in the products' dtype
    g: torch.Tensor,  # [c, V] fp32: G = dL/draw without its per-row factor c
    g_buf: torch.Tensor | None,  # [c_max, V] in the products' dtype, or None (fp32 products)
    row: torch.Tensor,  # [c] c * N
    coef: torch.Tensor,  # [c, 1] c
    spec: Spec,
    products: Products,
    grads: Grads,
    start: int,
    end: int,
) -> None:
    """One chunk's share of each wanted gradient (formulas: loss.py's module doc)."""
    g_op = g if g_buf is None else g_buf[: end - start].copy_(g)  # [c, V] in the products' dtype
    if grads.h is not None:
        grad_h = grads.h[start:end]  # [c, d]
        products.mm(g_op, w_op, out=grad_h)
        grad_h.mul_(coef)
    if grads.w is not None:
        # c ⊙ h as (w s) ⊙ h, the 1/N applied by the product: an fp16 operand would underflow
        products.addmm_(grads.w, g_op.t(), products.operand(row[:, None] * h), alpha=1.0 / spec.normalizer)
    if grads.b is not None:
        grads.b.addmv_(g.t(), coef.squeeze(1))  # [V]
    if grads.u is not None and lora_b32 is not None:
        grad_u = grads.u[start:end]  # [c, r]
        torch.mm(g, lora_b32, out=grad_u)
        grad_u.mul_(coef)
    if grads.lora_b is not None and u_c is not None:
        grads.lora_b.addmm_(g.t(), coef * u_c)  # [V, r]
