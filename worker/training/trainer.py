"""The training loop every worker runs, top to bottom: setup, train, evaluate, save, resume.

One optimizer step = `batch_size` sequences over all the job's processes (one, or K under
torchrun: distributed.py). Each process takes its share of the step (longest first, dealt round
robin) and splits it into micro-batches of `micro_batch_size` sequences; each micro-batch runs
the Objective (objective.py: the backbone, then the fused loss over the output projection) with
the step's trained-token count N, all-reduced over the processes, as normaliser. So the step's
gradient does not depend on the number of processes nor on how the batch was split, which is
also what makes halving the micro-batch after an out-of-memory safe (memory.py).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.training import checkpoint as ckpt
from worker.training import memory
from worker.training.config import TrainingConfig
from worker.training.data import (
    MicroBatch,
    TokenizedDataset,
    empty_batch,
    eval_batches,
    micro_batch_count,
    micro_batches,
    plan_epoch,
    probe_window,
    shard_step,
    steps_per_epoch,
)
from worker.training.distributed import (
    World,
    all_reduce_gradients,
    full_tensor,
    init_world,
    shut_down,
    world_from_env,
)
from worker.training.errors import TrainingError, UnusableDataError
from worker.training.loss import LossStats, allow_tf32
from worker.training.model import base_dtype, causal_lm, resolve_device, resolve_precision
from worker.training.objective import check_head
from worker.training.optim import build_optimizer, build_scheduler
from worker.training.outputs import RunLog, run_summary
from worker.training.setup import build_model, load_data, optimizer_state, restore_optimizer, weights_writer

Row = dict[str, Any]
__all__ = ["Trainer", "TrainingError", "train"]


@dataclass
class TrainResult:
    status: str  # "completed", "cancelled", or "stopped" (on request, after a checkpoint of its step)
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
        checkpoint_on_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.on_metrics = on_metrics or (lambda row: None)
        self.on_event = on_event or (lambda row: None)
        self.should_stop = should_stop or (lambda: False)
        # Asked when it stops: save a checkpoint of the current step first (pause, preemption), so
        # that the job later resumes exactly where it stopped rather than at its last scheduled one.
        self.checkpoint_on_stop = checkpoint_on_stop or (lambda: False)
        self.step = 0  # optimizer steps completed
        self.counters = {"trained_tokens": 0, "real_tokens": 0, "processed_tokens": 0, "skipped_steps": 0}
        self.elapsed_before = 0.0  # seconds spent by earlier runs of this job (before a resume)
        self.started = time.perf_counter()  # reset when train() starts
        self.last_row: Row = {}
        self.world: World = world_from_env()

    def event(self, level: str, message: str, **data: Any) -> None:
        """Rank 0 writes events (every rank of a multi-GPU job would say the same)."""
        if self.world.is_main:
            self.on_event(self.log.event(level, message, self.step, **data))

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self.device = resolve_device(cfg.device, self.world.local_rank)
        self.world = init_world(self.world, self.device, cfg.collective_timeout_s)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cuda":
            allow_tf32()
        world = self.world
        # FSDP shards full fine-tunes; LoRA replicates (its adapters and their gradients are small).
        self.sharded = world.distributed and (
            cfg.distributed == "fsdp" or (cfg.distributed == "auto" and not cfg.lora)
        )
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(cfg.output_dir, enabled=world.is_main)
        if world.is_main:
            for leftover in ckpt.remove_partial_checkpoints(cfg.output_dir):
                self.event(
                    "warning", f"removed {leftover.name}, an incomplete checkpoint left by a killed save"
                )
        world.barrier()
        resume_from = ckpt.latest_checkpoint(cfg.output_dir)
        torch.manual_seed(cfg.seed)  # fresh LoRA adapters are drawn from it: the same on every rank

        self.objective, self.tokenizer = build_model(
            cfg, resume_from, self.precision, self.device, world, self.sharded
        )
        self.model = self.objective.model
        self.lm = causal_lm(self.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.base_dtype = base_dtype(cfg.model)

        # Data: every process reads and tokenises the same files (deterministic), then takes its share.
        self.train_data = self._load_data(cfg.train_file, "train_file")
        self.valid_data = (
            self._load_data(cfg.validation_file, "validation_file") if cfg.validation_file else None
        )
        self.steps_per_epoch = steps_per_epoch(len(self.train_data.examples), cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.n_epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self._plan: tuple[int, list[list[int]]] = (-1, [])
        self.memory = memory.MemoryPlan.for_run(cfg, world, self.device, self.sharded, self._halved)

        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)

        probe = probe_window(self.train_data.examples, self.pad_id)
        head = check_head(self.objective, probe, cfg.model, self.memory.advice)
        self._reshard()
        self.objective.head = head
        if head.describe() != "plain":
            self.event("info", f"output head: {head.describe()} (checked against the model's own logits)")
        self.fingerprint = ckpt.run_fingerprint(cfg)
        if resume_from is not None:
            self.resume(resume_from)
        else:
            self.log.metrics.truncate_after_step(0)  # rows of a run killed before its first checkpoint
            memory.allocate_optimizer_state(self.optimizer, self.params)
        self.event(
            "info",
            f"training on {world.world_size} {self.device.type} process{'es' if world.distributed else ''}"
            + (f" ({'fsdp' if self.sharded else 'ddp'})" if world.distributed else "")
            + f", precision {self.precision.name}, micro-batch {self.memory.size}",
            world_size=world.world_size,
            precision=self.precision.name,
        )
        self.preflight()

    def _load_data(self, path: Path, field: str) -> TokenizedDataset:
        cfg = self.config
        data = load_data(path, field, self.tokenizer, cfg)
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

    def _seed(self) -> None:
        """Every step draws from a generator seeded by (seed, step, rank): dropout is the same
        whether the run was interrupted or not, with no generator state to save."""
        torch.manual_seed((self.config.seed * 1_000_003 + self.step * 7919 + self.world.rank) % 2**63)

    # -- memory --------------------------------------------------------------------------------
    def preflight(self) -> None:
        """The largest micro-batch this run will see, forward and backward once (discarded)."""
        examples = self.train_data.examples
        longest = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))

        def largest() -> None:
            size = self.memory.size
            batch = micro_batches(examples, longest[:size], size, self.pad_id, packing=self.config.packing)[0]
            self.objective(batch, float(max(batch.n_trained, 1))).loss.backward()

        self.objective.train()
        while not self.memory.fits(largest, self._clear_gradients):
            pass
        self._clear_gradients()

    def _clear_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _halved(self, size: int, error: str) -> None:
        self.event(
            "warning",
            f"out of memory with micro-batch {size * 2}; retrying with {size} "
            f"(same result: the step's loss is normalised by its trained tokens)",
            micro_batch_size=size,
            error=error,
        )

    # -- train ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config
        self.started = time.perf_counter()
        status = "completed"
        checkpoint = ckpt.latest_checkpoint(cfg.output_dir)
        while self.step < self.total_steps:
            if self.world.from_main(self.should_stop()):
                if self.world.from_main(self.checkpoint_on_stop()):
                    status = "stopped"
                    if self.step and (checkpoint is None or checkpoint.name != f"step-{self.step:06d}"):
                        checkpoint = self.save_checkpoint()
                    self.event("info", f"stopped at step {self.step} on request, after a checkpoint of it")
                else:
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
            try:
                row = self.train_step(self._plan[1][index])
            except Exception as err:
                self.memory.restart_smaller(err)  # FSDP: out of memory anywhere in the step
                raise
            if self.valid_data is not None and (
                self.step == self.total_steps or (cfg.eval_every and self.step % cfg.eval_every == 0)
            ):
                row.update(self.evaluate())
            self.last_row = row
            self.log.metrics.append(row)
            if self.world.is_main:
                self.on_metrics(row)
            if self.step == self.total_steps or (
                cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            ):
                checkpoint = self.save_checkpoint()
        summary = run_summary(
            status,
            self.config.loss,
            self.step,
            self.total_steps,
            self.counters,
            self.train_data,
            self.last_row,
            checkpoint,
            elapsed_s=self.elapsed(),
            world_size=self.world.world_size,
            micro_batch_size=self.memory.size,
        )
        self.log.write_summary(summary)
        return TrainResult(status, self.step, self.total_steps, checkpoint, summary)

    def forward_loss(self, batch: MicroBatch, normalizer: float) -> tuple[torch.Tensor, LossStats]:
        out = self.objective(batch, normalizer)
        return out.loss, out.stats

    def _accumulate(self, local: list[int], normalizer: float, step_size: int) -> list[float]:
        """Forward and backward of this rank's micro-batches; [loss, nll, prob, correct, tokens,
        real, processed, aux x tokens] summed over them."""
        examples = self.train_data.examples
        batches = micro_batches(examples, local, self.memory.size, self.pad_id, packing=self.config.packing)
        # FSDP runs collectives in every pass: a rank with fewer sequences runs empty passes.
        passes = (
            micro_batch_count(step_size, self.world.world_size, self.memory.size)
            if self.sharded
            else len(batches)
        )
        sums = [0.0] * 8
        for i in range(passes):
            batch = batches[i] if i < len(batches) else empty_batch(self.train_data.examples, self.pad_id)
            out = self.objective(batch, normalizer, aux_weight=batch.n_trained / normalizer)
            out.loss.backward()
            s = out.stats
            real = batch.n_real if i < len(batches) else 0
            processed = batch.n_processed if i < len(batches) else 0
            values = (
                s.loss_sum,
                s.nll_sum,
                s.prob_sum,
                s.correct,
                s.tokens,
                real,
                processed,
                out.aux_loss * s.tokens,
            )
            sums = [a + b for a, b in zip(sums, values, strict=True)]
        return sums

    def train_step(self, indices: list[int]) -> Row:
        cfg = self.config
        t0 = time.perf_counter()
        world = self.world
        local = shard_step(self.train_data.examples, indices, world.rank, world.world_size)
        # N, the normaliser of the whole step: this rank's trained tokens, summed over the ranks.
        (n_trained,) = world.sum([float(sum(self.train_data.examples[i].n_trained for i in local))])
        # Gradients are averaged over ranks, so each rank's share is scaled by world_size.
        normalizer = max(n_trained, 1.0) / world.world_size
        sums: list[float] = []

        def work() -> None:
            nonlocal sums
            self._seed()
            sums = self._accumulate(local, normalizer, len(indices))

        self.objective.train()
        while not self.memory.fits(work, self._clear_gradients):
            pass
        if not self.sharded:
            all_reduce_gradients(self.params, world)
        sums = world.sum(sums)
        loss_sum, nll_sum, prob_sum, correct, tokens, real, processed, aux = sums
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = full_tensor(torch.nn.utils.get_total_norm(grads)) if grads else torch.tensor(0.0)
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

        self.counters["trained_tokens"] += int(n_trained)
        self.counters["real_tokens"] += int(real)
        self.counters["processed_tokens"] += int(processed)
        dt = time.perf_counter() - t0
        tokens = max(tokens, 1.0)
        row = {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": loss_sum / tokens,
            "nll": nll_sum / tokens,
            "mean_token_prob": prob_sum / tokens,
            "token_accuracy": correct / tokens,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "step_tokens": int(n_trained),
            "trained_tokens": self.counters["trained_tokens"],
            "tokens_per_sec": n_trained / dt,
            "padding_fraction": 1.0 - real / max(processed, 1.0),
            "skipped": skipped,
            "elapsed_s": round(self.elapsed(), 3),
        }
        if self.objective.aux_coef:
            row["aux_loss"] = aux / tokens
        return row

    def _reshard(self) -> None:
        """FSDP keeps the root's parameters gathered after a forward, for the backward that usually
        follows; after forwards without one (evaluation, the self-check) they are sharded again."""
        if self.sharded:
            self.objective.reshard()  # type: ignore[operator]

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @torch.no_grad()
    def evaluate(self) -> Row:
        """valid_loss (the objective), valid_nll, valid_token_accuracy, valid_mean_token_prob."""
        assert self.valid_data is not None
        cfg, world = self.config, self.world
        self.objective.eval()
        examples = self.valid_data.examples
        batches = list(
            eval_batches(
                examples,
                cfg.eval_batch_size,
                self.pad_id,
                packing=cfg.packing,
                rank=world.rank,
                world_size=world.world_size,
            )
        )
        passes = (
            micro_batch_count(len(examples), world.world_size, cfg.eval_batch_size)
            if self.sharded
            else len(batches)
        )
        sums = [0.0] * 5
        for i in range(passes):
            s = self.objective(
                batches[i] if i < len(batches) else empty_batch(self.train_data.examples, self.pad_id), 1.0
            ).stats
            sums = [
                a + b
                for a, b in zip(sums, (s.loss_sum, s.nll_sum, s.prob_sum, s.correct, s.tokens), strict=True)
            ]
        self._reshard()
        self.objective.train()
        loss_sum, nll_sum, prob_sum, correct, tokens = world.sum(sums)
        tokens = max(tokens, 1.0)
        return {
            "valid_loss": loss_sum / tokens,
            "valid_nll": nll_sum / tokens,
            "valid_token_accuracy": correct / tokens,
            "valid_mean_token_prob": prob_sum / tokens,
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Every rank takes part (FSDP gathers the shards); rank 0 writes."""
        cfg = self.config
        t0 = time.perf_counter()
        write = weights_writer(cfg, self.objective, self.tokenizer, self.sharded, self.base_dtype)
        optim = optimizer_state(self.objective, self.optimizer, self.sharded)
        path = ckpt.checkpoints_dir(cfg.output_dir) / f"step-{self.step:06d}"
        if self.world.is_main:
            state = {
                "step": self.step,
                "optimizer": optim,
                "scheduler": self.scheduler.state_dict(),
                "counters": dict(self.counters),
                "elapsed_s": self.elapsed(),
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            }
            meta = {
                "base_model": cfg.model,
                "loss": cfg.loss,
                "lora": cfg.lora is not None,
                "precision": self.precision.name,
                "dtype": str(self.base_dtype).removeprefix("torch."),
                "world_size": self.world.world_size,
                "total_steps": self.total_steps,
                "metrics": self.last_row,
            }
            path = ckpt.save_checkpoint(
                cfg.output_dir, self.step, write, self.tokenizer, state, meta, keep_last_n=cfg.keep_last_n
            )
            seconds = time.perf_counter() - t0
            self.event(
                "info",
                f"saved checkpoint {path.name} in {seconds:.1f}s",
                checkpoint=str(path),
                seconds=seconds,
            )
        self.world.barrier()
        return path

    def resume(self, path: Path) -> None:
        state = ckpt.load_trainer_state(path)
        changed = ckpt.fingerprint_changes(json.loads(state["fingerprint"]), self.fingerprint)
        if changed:
            raise TrainingError(
                f"output_dir: {self.config.output_dir} holds a checkpoint of a different run "
                f"({', '.join(changed)} changed); use a new output_dir"
            )
        restore_optimizer(self.objective, self.optimizer, state["optimizer"], self.sharded)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.counters.update(state["counters"])
        self.elapsed_before = float(state["elapsed_s"])
        self.log.metrics.truncate_after_step(self.step)
        rows = self.log.metrics.read()
        self.last_row = rows[-1] if rows else {}
        self.event("info", f"resumed from checkpoint {path.name} (step {self.step} of {self.total_steps})")

    def close(self) -> None:
        """Leave the process group (a multi-GPU job); nothing to do for one process."""
        shut_down(self.world)


def train(config: TrainingConfig, **hooks: Any) -> TrainResult:
    """Set up and run one training job (resuming if output_dir holds a checkpoint)."""
    trainer = Trainer(config, **hooks)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()
