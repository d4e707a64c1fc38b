"""AdamW and the learning-rate schedule (linear warmup, then cosine, linear or constant)."""

from __future__ import annotations

import math

import torch

from worker.training.config import TrainingConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D)."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel is ~4x faster than the per-tensor loop on CPU (0.15 s vs 0.6 s per step for a
    # 135M model) and is available for float parameters on CPU and CUDA.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused or None,
    )


def lr_factor(cfg: TrainingConfig, total_steps: int, step: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup reaches the peak at the last warmup step (the first step already has a non-zero rate);
    the decay then ends just above 0 at the last step.
    """
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_scheduler == "linear":
        return 1.0 - progress
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, total_steps, step))
