"""One job on K processes of one node: `torchrun --nproc-per-node K -m worker.training CONFIG`.

Distribution is a property of the one trainer, read once from torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK), not a second trainer:

- every rank trains its share of every step's sequences (data.shard_step) and the step's trained-
  token count N is all-reduced, so the loss normaliser and therefore the update are those of one
  process with the same global batch;
- "ddp": every rank holds the whole model; after its micro-batches the gradients are all-reduced
  (averaged) in flat buckets. No collective runs inside a forward or backward, so an out-of-memory
  on one rank is agreed on by all and the step retried with smaller micro-batches;
- "fsdp": FSDP2 `fully_shard` per decoder layer and on the Objective as root: parameters,
  gradients and optimizer state are sharded (reduce-scatter averages over ranks). The model is
  built on the meta device on every rank and filled from rank 0's copy, so the host holds one
  full copy of the weights, not K;
- rank 0 alone writes metrics, events and checkpoints; checkpoints are consolidated (one ordinary
  Hugging Face directory and an optimizer state keyed by parameter name), so a job resumes on any K;
- collectives time out after `collective_timeout_s` (a hung rank fails the job instead of holding
  its GPUs), and torchrun takes the whole group down when one rank dies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # where collective tensors live: the GPU under NCCL, the CPU under gloo
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return [float(x) for x in t.tolist()]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one."""
        return self.sum([1.0 if flag else 0.0])[0] > 0 if self.distributed else flag

    def from_main(self, flag: bool) -> bool:
        """Rank 0's value of a flag, on every rank (e.g. 'a STOP file exists')."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.comm_device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def world_from_env() -> World:
    """This process's place in the job (a single process when not started by torchrun)."""
    return World(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_world(world: World, device: torch.device, timeout_s: int) -> World:
    """Join the process group (NCCL on GPUs, gloo on CPU) with a collective timeout."""
    if not world.distributed:
        return world
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # A failed or timed-out NCCL collective aborts the communicator and raises, instead of
        # hanging: the process exits and torchrun takes the group down.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    world.comm_device = device if device.type == "cuda" else torch.device("cpu")
    return world


def shut_down(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_gradients(
    params: list[torch.nn.Parameter], world: World, bucket_bytes: int = 256 << 20
) -> None:
    """Average the gradients of replicated parameters over ranks (DDP), in flat buckets per dtype."""
    if not world.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for g in group:
            nbytes = g.numel() * g.element_size()
            if buckets[-1] and size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(g)
            size += nbytes
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket]).to(world.comm_device)
            dist.all_reduce(flat)
            flat.div_(world.world_size)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def shard(
    objective: torch.nn.Module, layers: list[torch.nn.Module], world: World, param_dtype: torch.dtype | None
) -> None:
    """FSDP2: each decoder layer its own unit, the Objective (embeddings, final norm, output
    projection) the root. `param_dtype` is the compute dtype of bf16-mixed (gradients are
    reduced in fp32); None keeps the parameters' own dtype (fp32 or bf16-pure)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.comm_device.type, (world.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(objective, mesh=mesh, mp_policy=policy)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective under FSDP); a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
