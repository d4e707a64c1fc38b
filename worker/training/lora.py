"""LoRA's down-projection with its dropout folded in, saving no activation of its own.

PEFT computes a LoRA term as `B(A(dropout(x))) * scaling`. Autograd then keeps, per adapted
layer, the dropout's mask (on the CPU a noise tensor of x's dtype, on CUDA a bool mask) and
dropout(x) (A's input, in A's dtype: an fp32 copy of a bf16 x under bf16-mixed, since PEFT casts
x to the fp32 adapter's dtype first). With seven adapted projections per decoder layer that is
more than the frozen layers' own activations: bench/memory_model.py measured it as the reason a
bf16 LoRA step needed 0.72x the memory of an fp32 one instead of about half.

`DropoutLinear` (the class of every `lora_A` after `fold_dropout`) computes
`dropout(x) @ A^T` in one autograd function that saves x itself (the tensor the frozen layer
already keeps) and a seed: the backward pass draws the same mask again from that seed. The seed
comes from torch's default generator, so a run stays reproducible by its per-step seeding and a
checkpointed layer's recomputation (which restores the RNG state) draws the same masks. The
adapter's parameters and state-dict keys are PEFT's own, so adapters save, load and merge as
before. Under autocast the product runs in the autocast dtype with `A` cast to it, as autocast
would run `A`'s linear layer; PEFT's cast of x to the adapter's dtype is turned off for the same
reason (autocast casts for the product; the frozen layer's input is not copied).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _noise(x: torch.Tensor, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The dropout multiplier of `seed`: 0 with probability p, else 1 / (1 - p)."""
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    keep = torch.empty(x.shape, dtype=dtype, device=x.device).bernoulli_(1.0 - p, generator=generator)
    return keep.div_(1.0 - p)


class _DropoutMatmul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int, dtype: torch.dtype
    ) -> Any:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed, ctx.dtype = p, seed, dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            xd = x.to(dtype) * _noise(x, p, seed, dtype) if p > 0 else x.to(dtype)
            return xd @ weight.to(dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        p, seed, dtype = ctx.p, ctx.seed, ctx.dtype
        grad = grad.to(dtype)
        noise = _noise(x, p, seed, dtype) if p > 0 else None
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gx = grad @ weight.to(dtype)
            grad_x = (gx.mul_(noise) if noise is not None else gx).to(x.dtype)
        if ctx.needs_input_grad[1]:
            xd = x.to(dtype) * noise if noise is not None else x.to(dtype)
            flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), xd.reshape(-1, xd.shape[-1])
            grad_w = (flat_grad.t() @ flat_x).to(weight.dtype)
        return grad_x, grad_w, None, None, None


class DropoutLinear(nn.Linear):
    """A bias-free `nn.Linear` (LoRA's `A`) that applies dropout with probability `dropout_p` to
    its input in training mode, inside one autograd function (see the module docstring)."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = torch.promote_types(x.dtype, self.weight.dtype)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return _DropoutMatmul.apply(x, self.weight, p, seed, dtype)


def fold_dropout(model: nn.Module) -> int:
    """Give every vanilla LoRA layer of a PEFT `model` a `DropoutLinear` down-projection (its
    dropout moved inside, the `lora_dropout` module made an identity) and keep its input's dtype;
    the number of adapters changed. Variants (DoRA...) and biased `A`s are left as PEFT has them."""
    changed = 0
    for module in model.modules():
        lora_a, dropouts = getattr(module, "lora_A", None), getattr(module, "lora_dropout", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(dropouts, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {})
        for name, a in lora_a.items():
            if name in variants or type(a) is not nn.Linear or a.bias is not None:
                continue
            dropout = dropouts[name]
            a.__class__ = DropoutLinear
            a.dropout_p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
            dropouts[name] = nn.Identity()
            changed += 1
        module.cast_input_dtype_enabled = False  # type: ignore[assignment]
    return changed
