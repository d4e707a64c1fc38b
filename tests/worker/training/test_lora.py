"""LoRA's dropout folded into its down-projection (worker/training/lora.py): the same function and
gradients as dropout followed by the linear layer, drawn again in backward rather than stored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from worker.training.config import LoraConfig
from worker.training.data import micro_batches
from worker.training.lora import DropoutLinear, _noise
from worker.training.trainer import Trainer

MakeConfig = Callable[..., Any]


def _dropout_linear(d_in: int, d_out: int, p: float) -> DropoutLinear:
    layer = DropoutLinear(d_in, d_out, bias=False)
    layer.dropout_p = p
    return layer


def test_forward_and_gradients_equal_dropout_then_linear() -> None:
    torch.manual_seed(0)
    layer = _dropout_linear(24, 5, 0.3)
    x = torch.randn(3, 7, 24, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    torch.set_rng_state(state)  # the seed the layer drew, and from it the mask
    seed = int(torch.randint(0, 2**62, (1,)).item())
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    noise = _noise(x_ref, 0.3, seed, torch.float32)
    y_ref = (x_ref * noise) @ w_ref.t()
    y_ref.backward(grad_out)

    dropped = float((noise == 0).float().mean())
    assert 0.2 < dropped < 0.4, dropped  # a real dropout at p = 0.3
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert x.grad is not None and layer.weight.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-6, atol=1e-6)


def test_no_dropout_in_eval_mode_and_fresh_masks_in_training() -> None:
    torch.manual_seed(0)
    layer = _dropout_linear(16, 4, 0.5)
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer(x), x @ layer.weight.t())
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)  # each call draws its own mask


def test_under_autocast_the_product_runs_in_bf16_on_a_bf16_input() -> None:
    layer = _dropout_linear(16, 4, 0.1)
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def _saved_bytes(trainer: Trainer) -> int:
    """Bytes autograd keeps for backward over one forward of the first micro-batch (distinct
    storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in trainer.objective.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    batch = micro_batches(trainer.train_data.examples, list(range(8)), 8, trainer.pad_id)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.objective(batch, normalizer=1.0)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_adapter_dropout_keeps_nothing_for_backward(make_config: MakeConfig, precision: str) -> None:
    """With dropout on every linear layer's adapter, autograd keeps no more than without it: no
    mask and no copy of the input (PEFT's own dropout keeps both, in fp32 under bf16-mixed)."""
    saved = {}
    for p in (0.0, 0.2):
        trainer = Trainer(make_config(precision=precision, lora=LoraConfig(r=4, dropout=p)))
        trainer.setup()
        saved[p] = _saved_bytes(trainer)
    assert saved[0.2] <= saved[0.0], saved


def test_checkpointed_layers_draw_the_same_masks_again(make_config: MakeConfig) -> None:
    """Gradient checkpointing recomputes each layer in backward: the adapters' masks must be the
    ones of the forward pass, or the weights would differ from a run without checkpointing."""
    weights = []
    for ckpt in (False, True):
        lora = LoraConfig(r=4, alpha=8, dropout=0.3)
        trainer = Trainer(
            make_config(lora=lora, gradient_checkpointing=ckpt, max_steps=3, learning_rate=1e-2)
        )
        trainer.setup()
        trainer.train()
        weights.append(
            {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        )
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
    lora_b = [v for n, v in weights[0].items() if "lora_B" in n]
    assert any(float(v.abs().max()) > 0 for v in lora_b)  # the adapters did train
