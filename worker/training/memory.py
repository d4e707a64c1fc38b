"""Out of memory is planned for, not hoped away.

- Before step 1 the run's largest micro-batch (its `micro_batch_size` longest sequences) goes
  forward and backward once with the optimizer state already allocated, and is discarded: a job
  that cannot fit fails in its first minute, saying what would fit.
- An out-of-memory halves the micro-batch (twice the accumulation passes: the same step, because
  the loss is normalised by the step's trained-token count N) and retries the step, down to one
  sequence. Each halving is an event and is written to `memory_plan.json` in the output directory,
  so a resumed run starts at the size that fits instead of finding it again.
"""

from __future__ import annotations

import gc
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free at import: the training child classifies its failures with this module
    import torch

    from worker.training.config import TrainingConfig
    from worker.training.distributed import World

PLAN_FILE = "memory_plan.json"
_CPU_ALLOCATOR_OOM = r"DefaultCPUAllocator: (can't allocate memory|not enough memory)"


class OutOfMemory(MemoryError):
    """The run cannot go on at this micro-batch size; the message says what would fit."""


def out_of_memory_error(err: BaseException) -> BaseException | None:
    """The out-of-memory error in `err` or in what caused it, else None.

    A failed allocation is torch's OutOfMemoryError on a GPU, a MemoryError in Python, and a plain
    RuntimeError from torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory", e.g.
    under RLIMIT_AS); it may surface wrapped, e.g. as the ImportError of a module being imported.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or type(current).__name__ == "OutOfMemoryError":
            return current
        if isinstance(current, RuntimeError) and re.search(_CPU_ALLOCATOR_OOM, str(current)):
            return current
        current = current.__cause__ or current.__context__
    return None


def release(device: torch.device) -> None:
    """Give back what a failed attempt held (the traceback's frames must be gone first)."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def planned_micro_batch(output_dir: Path, configured: int) -> int:
    """The micro-batch size to start with: the configured one, or a smaller one found to fit."""
    try:
        planned = int(json.loads((output_dir / PLAN_FILE).read_text())["micro_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return configured
    return max(1, min(configured, planned))


def save_plan(output_dir: Path, micro_batch_size: int) -> None:
    tmp = output_dir / f".{PLAN_FILE}.tmp"
    tmp.write_text(json.dumps({"micro_batch_size": micro_batch_size}))
    os.replace(tmp, output_dir / PLAN_FILE)


def advice(*, lora: bool, checkpointing: bool, max_seq_length: int, world_size: int, sharded: bool) -> str:
    """What would make a run that cannot fit one sequence fit."""
    options = []
    if not checkpointing:
        options.append("gradient_checkpointing: true (recomputes activations; ~30% slower)")
    if not lora:
        options.append("LoRA (hyperparameters.lora) instead of a full fine-tune")
    if not sharded:
        options.append("more GPUs with distributed: fsdp (shards weights and optimizer state)")
    elif world_size < 8:
        options.append(f"more GPUs than {world_size} (FSDP shards weights and optimizer state over them)")
    options.append(f"a smaller max_seq_length than {max_seq_length}")
    options.append("precision: bf16-pure or lora.quantize: nf4 (less memory per parameter)")
    return "; ".join(options)


def allocate_optimizer_state(optimizer: torch.optim.Optimizer, params: list[Any]) -> None:
    """Allocate AdamW's state now (zeros, step 0: exactly what its first step would create), so the
    preflight measures the whole footprint: an lr-0 step over zero gradients changes nothing."""
    import torch

    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0
    optimizer.zero_grad(set_to_none=True)


@dataclass
class MemoryPlan:
    """The micro-batch size of a run, halved on out-of-memory (see the module docstring)."""

    size: int  # sequences per forward pass on one device
    output_dir: Path
    world: World
    device: torch.device
    sharded: bool  # FSDP: an out-of-memory strands the other ranks in a collective
    advice: str  # what would fit, for the message of a run that cannot fit one sequence
    on_halve: Callable[[int, str], None] = field(default=lambda size, error: None)

    @classmethod
    def for_run(
        cls,
        cfg: TrainingConfig,
        world: World,
        device: torch.device,
        sharded: bool,
        on_halve: Callable[[int, str], None],
    ) -> MemoryPlan:
        """The plan of a run: its configured micro-batch, or the smaller one an earlier run found."""
        what_fits = advice(
            lora=cfg.lora is not None,
            checkpointing=cfg.gradient_checkpointing,
            max_seq_length=cfg.max_seq_length,
            world_size=world.world_size,
            sharded=sharded,
        )
        size = planned_micro_batch(cfg.output_dir, cfg.device_micro_batch(world.world_size))
        return cls(size, cfg.output_dir, world, device, sharded, what_fits, on_halve)

    def fits(self, work: Callable[[], None], clear: Callable[[], None]) -> bool:
        """Run `work` (forward and backward passes). False after an out-of-memory on any rank:
        `clear` has dropped the partial gradients and the size is halved, so the caller retries."""
        if self.sharded:
            return self._fits_sharded(work)
        failed = False
        message = "on another rank"
        try:
            work()
        except Exception as err:
            if out_of_memory_error(err) is None:
                raise
            failed = True
            message = str(err).splitlines()[0][:300]
        # No collective runs inside the passes (gradients are all-reduced after them): every rank
        # gets here, and they agree to retry together.
        if not self.world.any(failed):
            return True
        clear()
        release(self.device)
        self._halve(message)
        return False

    def _fits_sharded(self, work: Callable[[], None]) -> bool:
        try:
            work()
            return True
        except Exception as err:
            self.restart_smaller(err)
            raise

    def restart_smaller(self, err: BaseException) -> None:
        """Under FSDP the other ranks are inside a collective already: an out-of-memory (anywhere in
        a step) saves the halved size and the group exits; the job restarts at that size (the worker
        restarts it at once). Returns if `err` is not an out-of-memory this can help with."""
        if not self.sharded or out_of_memory_error(err) is None or isinstance(err, OutOfMemory):
            return  # (an OutOfMemory was raised by this very method, on the way out)
        if self.size == 1:
            raise OutOfMemory(
                f"out of memory with one sequence per micro-batch on rank {self.world.rank}; "
                f"what would fit: {self.advice}"
            ) from err
        save_plan(self.output_dir, self.size // 2)
        raise OutOfMemory(
            f"out of memory with micro-batch {self.size} on rank {self.world.rank}; "
            f"the job restarts with {self.size // 2}"
        ) from err

    def _halve(self, error: str) -> None:
        if self.size == 1:
            raise OutOfMemory(
                f"out of memory with one sequence per micro-batch on {self.device}; "
                f"what would fit: {self.advice}"
            )
        self.size //= 2
        if self.world.is_main:
            save_plan(self.output_dir, self.size)
        self.on_halve(self.size, error)
