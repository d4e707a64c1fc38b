"""The training objective as one module: the model's backbone, then the fused SFT/DFT loss.

`Objective.forward` is what one micro-batch runs: the transformer without its output projection,
the hidden states of the trained positions, and `fused_linear_cross_entropy` over the output
projection (loss.py), so the `[tokens, vocab]` logits never exist. Being one module is what lets
FSDP wrap it as the root (the output projection and embeddings are unsharded for exactly its
forward) and what makes the self-check below run the same path as training.

The head of a model is not always `h @ W^T + b`: Gemma-2/3 soft-cap their logits, Cohere and
Granite scale them, and a LoRA adapter may sit on the output projection. The fused loss takes the
transform (HeadSpec) and the adapter's low-rank term; `self_check` compares the fused loss of one
real batch with the model's own `logits` and keeps the HeadSpec that reproduces them, or refuses
the model by name before any training.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from worker.training.data import MicroBatch
from worker.training.loss import LossStats, fused_linear_cross_entropy
from worker.training.memory import OutOfMemory, out_of_memory_error
from worker.training.model import HeadSpec, ModelLoadError, causal_lm, head_candidates


@dataclass
class StepOutput:
    loss: torch.Tensor  # the micro-batch's share of the step's objective (differentiable)
    stats: LossStats  # sums over its trained tokens
    aux_loss: float  # MoE load-balancing loss of the micro-batch (0.0 for dense models)


class Objective(torch.nn.Module):
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        mode: str,
        chunk_size: int,
        autocast: torch.dtype | None,
        head: HeadSpec | None = None,
    ) -> None:
        super().__init__()
        self.model = model  # the transformers model, or its PEFT wrapper
        self.mode = mode
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast
        self.head = head or HeadSpec()
        lm = causal_lm(model)
        # MoE models (Mixtral, Qwen-MoE, OLMoE, ...) add a router load-balancing loss in their own
        # forward; it is added here the same way: the model module's load_balancing_loss_func.
        self._balance = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
        self.aux_coef = float(getattr(lm, "router_aux_loss_coef", 0.0) or 0.0)
        if self._balance is None or not hasattr(lm, "num_experts"):
            self.aux_coef = 0.0

    def train(self, mode: bool = True) -> Objective:
        super().train(mode)
        # bitsandbytes' CPU backend repacks a 4-bit layer's weights for inference the first time it
        # runs in eval mode without gradients, and cannot train on them after: 4-bit layers stay in
        # train mode (they have no dropout; the flag changes nothing else).
        for module in self.modules():
            if type(module).__name__ in ("Linear4bit", "Params4bit"):
                module.training = True
        return self

    def _autocast(self, device: torch.device) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def forward(
        self, batch: MicroBatch, normalizer: float, aux_weight: float = 0.0, logits: bool = False
    ) -> Any:
        """The micro-batch's loss (sum of its tokens' terms / normalizer) and statistics; with
        `logits=True`, the model's own full logits instead (the self-check's reference)."""
        lm: Any = causal_lm(self.model)
        device: torch.device = lm.get_input_embeddings().weight.device
        ids = batch.input_ids.to(device)
        inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if batch.attention_mask is not None:
            inputs["attention_mask"] = batch.attention_mask.to(device)
        if batch.position_ids is not None:
            inputs["position_ids"] = batch.position_ids.to(device)
        if logits:
            with self._autocast(device):
                return self.model(**inputs).logits
        if self.aux_coef:
            inputs["output_router_logits"] = True
        with self._autocast(device):
            out = lm.get_decoder()(**inputs)
        hidden = out.last_hidden_state  # [B, T, d]
        targets = batch.trained[:, 1:].to(device)  # [B, T-1]: is token t+1 trained?
        h = hidden[:, :-1][targets]  # [n, d] states that predict a trained token
        y = ids[:, 1:][targets]  # [n]
        weight, bias, lora = self._head_operands(lm.get_output_embeddings(), h, device)
        if self.autocast_dtype is not None and device.type == "cuda":
            # bf16-mixed on a GPU: the projection's matmuls in bf16 with fp32 accumulation (loss.py),
            # on a bf16 copy of the weight as autocast makes for any linear layer
            h, weight = h.to(self.autocast_dtype), weight.to(self.autocast_dtype)
        loss, stats = fused_linear_cross_entropy(
            h,
            weight,
            y,
            bias=bias,
            mode=self.mode,  # type: ignore[arg-type]
            normalizer=normalizer,
            chunk_size=self.chunk_size,
            logit_scale=self.head.logit_scale,
            softcap=self.head.softcap,
            lora=lora,
        )
        aux = 0.0
        if self.aux_coef and aux_weight and self._balance is not None:
            balance = self._balance(
                out.router_logits, lm.num_experts, lm.num_experts_per_tok, inputs.get("attention_mask")
            )
            loss = loss + self.aux_coef * aux_weight * balance.float()
            aux = float(balance.detach())
        return StepOutput(loss, stats, aux)

    def _head_operands(
        self, head: Any, h: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """(W, b, LoRA term) of the output projection; a PEFT LoRA layer on it contributes
        u = scaling * A(dropout(h)) and B (the fused loss adds u @ B^T to the logits)."""
        base = getattr(head, "base_layer", None)
        if base is None:
            return head.weight, getattr(head, "bias", None), None
        active = [a for a in getattr(head, "active_adapters", []) if a in getattr(head, "lora_A", {})]
        if getattr(head, "disable_adapters", False) or getattr(head, "merged", False) or not active:
            return base.weight, base.bias, None
        if len(active) > 1:
            raise ModelLoadError("model: more than one active LoRA adapter on the output projection")
        name = active[0]
        a, b = head.lora_A[name], head.lora_B[name]
        with self._autocast(device):
            u = a(head.lora_dropout[name](h.to(a.weight.dtype))) * head.scaling[name]  # [n, r]
        return base.weight, base.bias, (u, b.weight)


def naive_stats(logits: torch.Tensor, batch: MicroBatch) -> LossStats:
    """LossStats of the trained tokens straight from full logits (float64), in DFT and SFT terms."""
    targets = batch.trained[:, 1:].to(logits.device)
    ids = batch.input_ids.to(logits.device)
    z = logits[:, :-1][targets].double()  # [n, V]
    y = ids[:, 1:][targets]
    log_p = torch.log_softmax(z, dim=-1).gather(1, y[:, None]).squeeze(1)
    p = log_p.exp()
    return LossStats(
        float(-(p * log_p).sum()),
        float(-log_p.sum()),
        float(p.sum()),
        float((z.argmax(1) == y).sum()),
        float(y.numel()),
    )


def _mismatch(ours: LossStats, model: LossStats) -> float:
    """How far the fused loss's statistics are from the model's own: the relative difference of the
    mean NLL plus the absolute difference of the mean target probability (inf: other tokens)."""
    if ours.tokens != model.tokens:
        return math.inf
    n = max(model.tokens, 1.0)
    nll, theirs = ours.nll_sum / n, model.nll_sum / n
    return abs(nll - theirs) / max(abs(theirs), 1.0) + abs(ours.prob_sum - model.prob_sum) / n


# Both sides compute the logits in fp32 from the same hidden states and weights: a head that is
# the model's own agrees to ~1e-6; a wrong transform is off by far more on real logits.
_TOLERANCE = 1e-3


@contextmanager
def _fp32_head(lm: Any) -> Iterator[None]:
    """The model's own output projection computed in fp32 (on its usual inputs and weights),
    so that a bf16 model's reference logits are not rounded to bf16 before they are compared."""
    head = lm.get_output_embeddings()
    linear = getattr(head, "base_layer", head)

    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if linear.bias is None else linear.bias.float()
        return torch.nn.functional.linear(x.float(), linear.weight.float(), bias)

    linear.forward = forward
    try:
        yield
    finally:
        del linear.forward  # back to the class's own forward


def check_head(objective: Objective, batch: MicroBatch, model_name: str, what_fits: str) -> HeadSpec:
    """`self_check` over every head the model's config could mean; an out-of-memory in it (a pass
    of one short sequence, cheaper than any training pass) says what would fit."""
    candidates = head_candidates(causal_lm(objective.model).config)
    try:
        return self_check(objective, batch, candidates, model_name)
    except Exception as err:
        if out_of_memory_error(err) is None:
            raise
        raise OutOfMemory(
            f"out of memory in the start-up check of one sequence; what would fit: {what_fits}"
        ) from err


def self_check(
    objective: Objective, batch: MicroBatch, candidates: list[HeadSpec], model_name: str
) -> HeadSpec:
    """The HeadSpec under which the fused loss reproduces the model's own logits on `batch`.

    Runs in eval mode without gradients, the model's projection in fp32 (so the comparison holds to
    1e-3 whatever the precision), and keeps the candidate closest to the model's own statistics. A
    model whose head none of the candidates reproduces is refused, by name, before any training."""
    was_training = objective.training
    saved_head, saved_autocast = objective.head, objective.autocast_dtype
    lm = causal_lm(objective.model)
    if lm.get_output_embeddings().weight.dtype == torch.float32:
        objective.autocast_dtype = None  # fp32 master weights (bf16-mixed): compare in fp32
    objective.eval()
    try:
        with torch.no_grad():
            with _fp32_head(lm):
                reference = naive_stats(objective(batch, 1.0, logits=True), batch)
            found = []
            for spec in candidates:
                objective.head = spec
                ours = objective(batch, 1.0).stats
                found.append((_mismatch(ours, reference), spec, ours.nll_sum / max(ours.tokens, 1)))
    finally:
        objective.head, objective.autocast_dtype = saved_head, saved_autocast
        objective.train(was_training)
    # The closest candidate, not the first that is close: on small logits (a fresh model) a soft-cap
    # is nearly the identity, and only the model's own head fits to rounding.
    best, spec, _ = min(found, key=lambda f: f[0])
    if best <= _TOLERANCE:
        return spec
    seen = [f"{s.describe()} head: NLL {nll:.4f}" for _, s, nll in found]
    model_nll = reference.nll_sum / max(reference.tokens, 1)
    raise ModelLoadError(
        f"model: {model_name!r}: the fused loss cannot reproduce this model's own logits (its NLL on the "
        f"first training example is {model_nll:.4f}; {'; '.join(seen)}): its output head does something "
        "tunepool does not model, so it is refused"
    )
