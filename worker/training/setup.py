"""What the trainer builds before step 1 and moves in and out of checkpoints: the model in its
memory model (one process, a DDP replica, or FSDP shards filled from rank 0), the tokenised data,
and the weights and optimizer state as full, name-keyed state dicts (so any K resumes any K)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from worker.training import checkpoint as ckpt
from worker.training.config import TrainingConfig
from worker.training.data import TokenizedDataset, load_dataset
from worker.training.distributed import World, shard
from worker.training.errors import InvalidDataError, UnusableDataError
from worker.training.formats import DataFormatError
from worker.training.model import (
    Precision,
    causal_lm,
    decoder_layers,
    enable_checkpointing,
    load_config,
    load_model,
    prepare_model,
    resolve_attention,
)
from worker.training.objective import Objective

# The Objective holds the model as its submodule `model`: state-dict keys carry this prefix.
_PREFIX = "model."


def build_model(
    cfg: TrainingConfig,
    resume_from: Path | None,
    precision: Precision,
    device: torch.device,
    world: World,
    sharded: bool,
) -> tuple[Objective, Any]:
    """The Objective to train, on `device`, and the tokenizer."""
    # Under FSDP's mixed-precision policy the shards are cast for compute: no autocast on top.
    autocast = None if sharded else precision.autocast
    if not sharded:
        model, tokenizer = prepare_model(cfg, resume_from, precision, device)
        objective = Objective(model, mode=cfg.loss, chunk_size=cfg.loss_chunk_size, autocast=autocast)
        if cfg.lora is None and resume_from is not None:
            exact = ckpt.exact_weights(resume_from)  # fp32 master weights of a bf16-saved checkpoint
            if exact:
                causal_lm(model).load_state_dict(exact, strict=False)
        return objective, tokenizer

    # FSDP: built on the meta device everywhere, sharded, then filled from rank 0's one copy.
    from transformers import AutoModelForCausalLM

    source = str(resume_from) if resume_from is not None else cfg.model
    attn = resolve_attention(cfg.attn_implementation, device, source)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(
            load_config(source),
            dtype=precision.param_dtype,
            attn_implementation=attn,
            trust_remote_code=False,
        )
    enable_checkpointing(lm, cfg)
    objective = Objective(lm, mode=cfg.loss, chunk_size=cfg.loss_chunk_size, autocast=autocast)
    compute = precision.compute_dtype if precision.compute_dtype != precision.param_dtype else None
    shard(objective, decoder_layers(lm), world, compute)
    objective.to_empty(device=device)
    full: dict[str, Any] = {}
    buffers: dict[str, torch.Tensor] = {}
    tokenizer = None
    if world.is_main:
        real, tokenizer = load_model(source, dtype=precision.param_dtype)
        full = {_PREFIX + k: v for k, v in real.state_dict().items()}
        if resume_from is not None:
            full.update({_PREFIX + k: v for k, v in ckpt.exact_weights(resume_from).items()})
        buffers = {_PREFIX + k: v for k, v in real.named_buffers()}
        del real
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(objective, full, options=options)
    # Buffers that are not in a state dict (rotary frequencies) were left uninitialised by to_empty.
    for name, buffer in objective.named_buffers():
        if world.is_main:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, 0)
    if tokenizer is None:
        _, tokenizer = _tokenizer_only(source)
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    return objective, tokenizer


def _tokenizer_only(source: str) -> tuple[None, Any]:
    from transformers import AutoTokenizer

    path = Path(source)
    if source.endswith(".gguf"):
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return None, tok


def load_data(path: Path, field: str, tokenizer: Any, cfg: TrainingConfig) -> TokenizedDataset:
    """A training or validation file, tokenised; errors name the field (and the lines)."""
    if not path.is_file():
        raise UnusableDataError(field, f"{path} does not exist")
    try:
        data = load_dataset(
            path,
            tokenizer,
            max_seq_length=cfg.max_seq_length,
            overlength=cfg.overlength,
            max_line_bytes=cfg.max_line_bytes,
        )
    except DataFormatError as err:
        raise InvalidDataError(field, err) from None
    return data


def full_state_dict(objective: Objective, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU, keys as the model names them (rank 0's is full;
    under FSDP every rank must call this: it gathers the shards)."""
    if sharded:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state: dict[str, Any] = get_model_state_dict(objective, options=options)
    else:
        state = {_PREFIX + k: v.detach().cpu() for k, v in causal_lm(objective.model).state_dict().items()}
    return {k.removeprefix(_PREFIX): v for k, v in state.items()}


def optimizer_state(objective: Objective, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """AdamW's state keyed by parameter name, whole (gathered from the shards under FSDP)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    return get_optimizer_state_dict(objective, optimizer, options=options)


def restore_optimizer(
    objective: Objective, optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool
) -> None:
    """Load a checkpoint's optimizer state, saved by name on any number of ranks (its weights came
    with the model, in build_model)."""
    groups = state.get("param_groups") or [{}]
    if any(isinstance(p, int) for p in groups[0].get("params", [])):
        optimizer.load_state_dict(state)  # a checkpoint of a single-process run before names were kept
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_optimizer_state_dict(objective, optimizer, optim_state_dict=state, options=options)


def weights_writer(
    cfg: TrainingConfig, objective: Objective, tokenizer: Any, sharded: bool, dtype: torch.dtype
) -> Callable[[Path], None]:
    """What writes a checkpoint's weights (rank 0 calls it). Under FSDP every rank must call this
    function itself: it gathers the full state dict."""
    if cfg.lora is not None:
        merge = bool(cfg.lora.merge)
        return lambda d: ckpt.write_lora(d, objective.model, tokenizer, merge=merge, dtype=dtype)
    state = full_state_dict(objective, sharded)
    lm = causal_lm(objective.model)
    return lambda d: ckpt.write_full_model(d, lm, state, dtype)
