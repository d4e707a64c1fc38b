"""The training loop every worker runs, top to bottom: setup, train, evaluate, save, resume.

One optimizer step = `batch_size` sequences, split into `gradient_accumulation_steps`
micro-batches of similar length. Each micro-batch runs the model's backbone only; the hidden
states of the trained positions go to the fused loss (loss.py) with the step's trained-token
count N as normaliser, so the step's gradient does not depend on how the batch was split.
"""

from __future__ import annotations

import json
import random
import re
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.training import checkpoint as ckpt
from worker.training.config import TrainingConfig
from worker.training.data import (
    MicroBatch,
    TokenizedDataset,
    eval_batches,
    load_dataset,
    micro_batches,
    plan_epoch,
    steps_per_epoch,
)
from worker.training.errors import InvalidDataError, TrainingError, UnusableDataError
from worker.training.formats import DataFormatError
from worker.training.loss import LossStats, fused_linear_cross_entropy
from worker.training.model import causal_lm, prepare_model, resolve_device
from worker.training.optim import build_optimizer, build_scheduler
from worker.training.outputs import RunLog

Row = dict[str, Any]
# The metrics of the last step that summary.json repeats as "final".
_FINAL_FIELDS = (
    "loss",
    "nll",
    "mean_token_prob",
    "token_accuracy",
    "valid_loss",
    "valid_nll",
    "valid_token_accuracy",
)
__all__ = ["InvalidDataError", "Trainer", "TrainingError", "train"]


@dataclass
class TrainResult:
    status: str  # "completed" or "cancelled"
    step: int
    total_steps: int
    checkpoint: Path | None
    summary: dict[str, Any]


class Trainer:
    def __init__(
        self,
        config: TrainingConfig,
        *,
        on_metrics: Callable[[Row], None] | None = None,
        on_event: Callable[[Row], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.on_metrics = on_metrics or (lambda row: None)
        self.on_event = on_event or (lambda row: None)
        self.should_stop = should_stop or (lambda: False)
        self.step = 0  # optimizer steps completed
        self.counters = {"trained_tokens": 0, "real_tokens": 0, "processed_tokens": 0, "skipped_steps": 0}
        self.elapsed_before = 0.0  # seconds spent by earlier runs of this job (before a resume)
        self.started = time.perf_counter()  # reset when train() starts
        self.last_row: Row = {}

    def event(self, level: str, message: str, **data: Any) -> None:
        self.on_event(self.log.event(level, message, self.step, **data))

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        use_bf16 = cfg.precision == "bfloat16" or (
            cfg.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)

        for leftover in ckpt.remove_partial_checkpoints(cfg.output_dir):
            self.event("warning", f"removed {leftover.name}, an incomplete checkpoint left by a killed save")
        resume_from = ckpt.latest_checkpoint(cfg.output_dir)

        model, self.tokenizer = prepare_model(cfg, resume_from)
        self.model = model.to(self.device)
        self.lm = causal_lm(self.model)
        self.backbone = self.lm.get_decoder()  # the transformer without its output projection
        self.head = self.lm.get_output_embeddings()
        self.pad_id = int(self.tokenizer.pad_token_id)

        # Data.
        self.train_data = self._load_data(cfg.train_file, "train_file")
        self.valid_data = (
            self._load_data(cfg.validation_file, "validation_file") if cfg.validation_file else None
        )
        self.steps_per_epoch = steps_per_epoch(len(self.train_data.examples), cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.n_epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self._plan: tuple[int, list[list[int]]] = (-1, [])

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)

        self.fingerprint = ckpt.run_fingerprint(cfg)
        if resume_from is not None:
            self.resume(resume_from)
        else:
            self.log.metrics.truncate_after_step(0)  # rows of a run killed before its first checkpoint

    def _load_data(self, path: Path, field: str) -> TokenizedDataset:
        cfg = self.config
        if not path.is_file():
            raise UnusableDataError(field, f"{path} does not exist")
        try:
            data = load_dataset(
                path,
                self.tokenizer,
                max_seq_length=cfg.max_seq_length,
                overlength=cfg.overlength,
                max_line_bytes=cfg.max_line_bytes,
            )
        except DataFormatError as err:
            raise InvalidDataError(field, err) from None
        stats = data.stats
        if stats.n_truncated or stats.n_dropped:
            self.event(
                "warning",
                f"{field}: {stats.n_truncated} examples truncated and {stats.n_dropped} dropped "
                f"(longer than max_seq_length={cfg.max_seq_length}, overlength={cfg.overlength})",
                truncated=stats.n_truncated,
                dropped=stats.n_dropped,
            )
        if not data.examples:
            raise UnusableDataError(
                field,
                f"all {stats.n_lines} examples are longer than max_seq_length={cfg.max_seq_length} "
                "or have no trained token left after truncation; raise max_seq_length",
            )
        self.event(
            "info",
            f"{field}: {len(data.examples)} {data.format} examples, {stats.n_trained_tokens} trained tokens",
            examples=len(data.examples),
            trained_tokens=stats.n_trained_tokens,
        )
        return data

    # -- train ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config
        self.started = time.perf_counter()
        status = "completed"
        checkpoint = ckpt.latest_checkpoint(cfg.output_dir)
        while self.step < self.total_steps:
            if self.should_stop():
                status = "cancelled"
                self.event("info", f"stopped at step {self.step} on request; last checkpoint kept")
                break
            epoch, index = divmod(self.step, self.steps_per_epoch)
            if self._plan[0] != epoch:
                lengths = [len(e.input_ids) for e in self.train_data.examples]
                plan = plan_epoch(
                    lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch, group_by_length=cfg.group_by_length
                )
                self._plan = (epoch, plan)
            row = self.train_step(self._plan[1][index])
            if self.valid_data is not None and (
                self.step == self.total_steps or (cfg.eval_every and self.step % cfg.eval_every == 0)
            ):
                row.update(self.evaluate())
            self.last_row = row
            self.log.metrics.append(row)
            self.on_metrics(row)
            if self.step == self.total_steps or (
                cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            ):
                checkpoint = self.save_checkpoint()
        summary = self._summary(status, checkpoint)
        self.log.write_summary(summary)
        return TrainResult(status, self.step, self.total_steps, checkpoint, summary)

    def forward_loss(self, batch: MicroBatch, normalizer: float) -> tuple[torch.Tensor, LossStats]:
        ids = batch.input_ids.to(self.device)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else nullcontext()
        )
        with autocast:
            out = self.backbone(
                input_ids=ids, attention_mask=batch.attention_mask.to(self.device), use_cache=False
            )
        hidden = out.last_hidden_state  # [B, T, d]
        targets = batch.trained[:, 1:].to(self.device)  # [B, T-1]: is token t+1 trained?
        h = hidden[:, :-1][targets]  # [n, d] states that predict a trained token
        y = ids[:, 1:][targets]  # [n]
        return fused_linear_cross_entropy(
            h,
            self.head.weight,
            y,
            bias=self.head.bias,
            mode=self.config.loss,
            normalizer=normalizer,
            chunk_size=self.config.loss_chunk_size,
        )

    def train_step(self, indices: list[int]) -> Row:
        cfg = self.config
        t0 = time.perf_counter()
        self.model.train()
        batches = micro_batches(
            self.train_data.examples, indices, cfg.gradient_accumulation_steps, self.pad_id
        )
        n_trained = sum(b.n_trained for b in batches)  # N: the normaliser of the whole step
        stats = LossStats.zero()
        for batch in batches:
            loss, batch_stats = self.forward_loss(batch, normalizer=max(n_trained, 1))
            loss.backward()
            stats += batch_stats
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        lr = self.scheduler.get_last_lr()[0]
        skipped = not bool(torch.isfinite(grad_norm))
        if skipped:
            self.counters["skipped_steps"] += 1
            self.event("warning", f"step {self.step + 1}: gradient is not finite; step skipped")
        else:
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, cfg.max_grad_norm, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # a skipped step still advances the schedule; torch warns when optimizer.step() was not called
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.step += 1

        real = sum(b.n_real for b in batches)
        processed = sum(b.n_processed for b in batches)
        self.counters["trained_tokens"] += n_trained
        self.counters["real_tokens"] += real
        self.counters["processed_tokens"] += processed
        dt = time.perf_counter() - t0
        tokens = max(stats.tokens, 1.0)
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": stats.loss_sum / tokens,
            "nll": stats.nll_sum / tokens,
            "mean_token_prob": stats.prob_sum / tokens,
            "token_accuracy": stats.correct / tokens,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "step_tokens": n_trained,
            "trained_tokens": self.counters["trained_tokens"],
            "tokens_per_sec": n_trained / dt,
            "padding_fraction": 1.0 - real / processed,
            "skipped": skipped,
            "elapsed_s": round(self.elapsed(), 3),
        }

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @torch.no_grad()
    def evaluate(self) -> Row:
        """valid_loss (the objective), valid_nll, valid_token_accuracy, valid_mean_token_prob."""
        assert self.valid_data is not None
        self.model.eval()
        stats = LossStats.zero()
        for batch in eval_batches(self.valid_data.examples, self.config.eval_batch_size, self.pad_id):
            stats += self.forward_loss(batch, normalizer=1.0)[1]
        self.model.train()
        tokens = max(stats.tokens, 1.0)
        return {
            "valid_loss": stats.loss_sum / tokens,
            "valid_nll": stats.nll_sum / tokens,
            "valid_token_accuracy": stats.correct / tokens,
            "valid_mean_token_prob": stats.prob_sum / tokens,
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        cfg = self.config
        t0 = time.perf_counter()
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "counters": dict(self.counters),
            "elapsed_s": self.elapsed(),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        meta = {
            "base_model": cfg.model,
            "loss": cfg.loss,
            "lora": cfg.lora is not None,
            "total_steps": self.total_steps,
            "metrics": self.last_row,
        }
        path = ckpt.save_checkpoint(
            cfg.output_dir,
            self.step,
            self.model,
            self.tokenizer,
            state,
            meta,
            is_lora=cfg.lora is not None,
            merge_lora=bool(cfg.lora and cfg.lora.merge),
            keep_last_n=cfg.keep_last_n,
        )
        seconds = time.perf_counter() - t0
        self.event(
            "info", f"saved checkpoint {path.name} in {seconds:.1f}s", checkpoint=str(path), seconds=seconds
        )
        return path

    def resume(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        changed = ckpt.fingerprint_changes(json.loads(state["fingerprint"]), self.fingerprint)
        if changed:
            raise TrainingError(
                f"output_dir: {self.config.output_dir} holds a checkpoint of a different run "
                f"({', '.join(changed)} changed); use a new output_dir"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.counters.update(state["counters"])
        self.elapsed_before = float(state["elapsed_s"])
        self.log.metrics.truncate_after_step(self.step)
        rows = self.log.metrics.read()
        self.last_row = rows[-1] if rows else {}
        self.event("info", f"resumed from checkpoint {path.name} (step {self.step} of {self.total_steps})")

    def _summary(self, status: str, checkpoint: Path | None) -> dict[str, Any]:
        c = self.counters
        stats = self.train_data.stats
        final = {k: v for k, v in self.last_row.items() if k in _FINAL_FIELDS}
        return {
            "status": status,
            "loss_mode": self.config.loss,
            "steps": self.step,
            "total_steps": self.total_steps,
            "trained_tokens": c["trained_tokens"],
            "padding_fraction": 1.0 - c["real_tokens"] / max(c["processed_tokens"], 1),
            "skipped_steps": c["skipped_steps"],
            "examples": len(self.train_data.examples),
            "truncated_examples": stats.n_truncated,
            "dropped_examples": stats.n_dropped,
            "final": final,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "elapsed_s": round(self.elapsed(), 3),
        }


def train(config: TrainingConfig, **hooks: Any) -> TrainResult:
    """Set up and run one training job (resuming if output_dir holds a checkpoint)."""
    trainer = Trainer(config, **hooks)
    trainer.setup()
    return trainer.train()
