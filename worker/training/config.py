"""The training configuration: one typed object, read from a JSON or YAML file.

Field names are a contract shared with the API (issue #3) and the worker (issue #4). Defaults
follow the DFT paper's recipe where it gives one (lr 5e-5, cosine, warmup 0.1, clip 1.0).
Impossible combinations are rejected with a message that names the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names each offending field."""


class LoraConfig(BaseModel):
    """Low-rank adapters (through `peft`) instead of a full fine-tune."""

    model_config = ConfigDict(extra="forbid")

    # Rank of the update matrices.
    r: int = Field(16, ge=1, le=1024)
    # Scaling numerator: the update is multiplied by alpha / r.
    alpha: float = Field(32.0, gt=0)
    # Dropout on the adapter input during training.
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Module names to adapt, or "all-linear" for every linear layer except the output projection.
    # "lm_head" may be named: its adapter is part of the fused loss (trained like any other).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Also write the merged full model (base + adapter) into each checkpoint's `merged/` folder.
    merge: bool = False
    # QLoRA: keep the frozen base in 4-bit NormalFloat ("nf4", through bitsandbytes) instead of
    # bf16/fp32; the adapters stay fp32. Needs bitsandbytes with a backend for the device.
    quantize: Literal["nf4"] | None = None

    @model_validator(mode="after")
    def _check_targets(self) -> LoraConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules: give at least one module name, or 'all-linear'")
        return self


class TrainingConfig(BaseModel):
    """Everything one fine-tuning run needs. Paths may be relative to the config file."""

    model_config = ConfigDict(extra="forbid")

    # -- what to train --------------------------------------------------------------------
    # Base model: a Hugging Face model directory, a hub id already in the local cache (never
    # downloaded), or a path to a .gguf file (dequantised to float32 on load).
    model: str = Field(min_length=1)
    # Objective: "sft" (mean NLL of the trained tokens) or "dft" (each token's NLL weighted by its
    # detached probability, arXiv:2508.05629).
    loss: Literal["sft", "dft"] = "dft"
    # Training data, JSONL: chat ({"messages": [...]}) or prompt/completion, see formats.py.
    train_file: Path
    # Optional held-out data in the same formats, evaluated every `eval_every` steps and at the end.
    validation_file: Path | None = None
    # Where metrics.jsonl, events.jsonl, summary.json and checkpoints/ go. A run that finds a
    # checkpoint here resumes from it.
    output_dir: Path

    # -- how long ---------------------------------------------------------------------------
    # Passes over the training data.
    n_epochs: int = Field(1, ge=1, le=1000)
    # Stop after this many optimizer steps (None: run all n_epochs). Caps n_epochs when smaller.
    max_steps: int | None = Field(None, ge=1)

    # -- batching ---------------------------------------------------------------------------
    # Sequences per optimizer step (the global batch, over all devices of the job).
    batch_size: int = Field(8, ge=1, le=65536)
    # Micro-batches per optimizer step on each device; batch_size must be a multiple of it. The
    # loss is normalised by the step's trained-token count N (over all devices), so this changes
    # memory, not the result.
    gradient_accumulation_steps: int = Field(1, ge=1)
    # Sequences per forward pass on one device (None: batch_size / (devices x
    # gradient_accumulation_steps), rounded up). Give this or gradient_accumulation_steps, not both.
    # An out-of-memory halves it for the rest of the run (same result, by the normaliser N).
    micro_batch_size: int | None = Field(None, ge=1, le=65536)
    # Padding-free batches: the sequences of a micro-batch are concatenated into one row, with
    # position ids restarting per sequence and attention confined to each sequence. Same loss and
    # gradients as padded batches, no compute spent on padding.
    packing: bool = False
    # Longest sequence in tokens (prompt + completion after the chat template).
    max_seq_length: int = Field(2048, ge=8, le=1_048_576)
    # What to do with longer examples: "truncate" keeps the first max_seq_length tokens (an
    # example with no trained token left is dropped), "drop" skips the example. Both are counted.
    overlength: Literal["truncate", "drop"] = "truncate"
    # Group examples of similar length into the same step so little compute is spent on padding.
    group_by_length: bool = True

    # -- optimisation -----------------------------------------------------------------------
    # Peak learning rate of AdamW.
    learning_rate: float = Field(5e-5, gt=0, le=1.0)
    # Shape of the learning rate after warmup: cosine to 0, linear to 0, or constant.
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    # Fraction of the total steps spent warming up linearly from 0 to learning_rate.
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    # Decoupled weight decay of AdamW (not applied to biases and norm weights).
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    # AdamW betas and epsilon.
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    # Clip the global gradient norm to this (None: never clip; the norm is still reported).
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    # Seeds Python, NumPy and torch, and the data order.
    seed: int = Field(42, ge=0, le=2**32 - 1)
    # Low-rank adapters; None is a full fine-tune.
    lora: LoraConfig | None = None

    # -- numerics and memory -----------------------------------------------------------------
    # "cpu", "cuda", "cuda:N", or "auto" (CUDA when available). Under torchrun each process
    # takes cuda:LOCAL_RANK.
    device: str = "auto"
    # Memory model:
    # - "fp32": weights, compute and optimizer in float32 (exact; the CPU default);
    # - "bf16-mixed": bf16 compute, fp32 master copies of the trained parameters and fp32
    #   optimizer state; a LoRA base stays frozen in bf16 (the default on a bf16-capable GPU);
    # - "bf16-pure": bf16 weights and optimizer state, for memory-bound full fine-tunes;
    # - "auto": bf16-mixed on a GPU that supports bf16, else fp32.
    # The fused loss accumulates in fp32 whatever the precision. ("float32" and "bfloat16", the
    # older names, mean fp32 and bf16-mixed.)
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-pure"] = "auto"
    # Trained tokens per chunk of the fused loss; its extra memory is one chunk x vocab fp32 tile
    # (200 MB at 1024 x 49152). Smaller saves memory, larger wastes it: 1024 was fastest on CPU.
    loss_chunk_size: int = Field(1024, ge=1, le=1_048_576)
    # Recompute activations in the backward pass: less memory, ~30% more time.
    gradient_checkpointing: bool = False
    # The attention kernel: "auto" (flash_attention_2 on CUDA where installed and the architecture
    # supports it, else transformers' default for the architecture: sdpa, or eager), or one of
    # transformers' names. Packing needs one that honours sequence boundaries: all of these do.
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    # A Jinja chat template that replaces the tokenizer's (e.g. one that renders reasoning
    # models' turns the same way whatever follows them); None keeps the model's own.
    chat_template: str | None = Field(None, min_length=1, max_length=200_000)

    # -- several devices (torchrun --nproc-per-node K -m worker.training CONFIG) ----------------
    # How K processes share one job: "ddp" replicates the model and all-reduces the gradients,
    # "fsdp" shards parameters, gradients and optimizer state per decoder layer (FSDP2);
    # "auto" is DDP for LoRA and FSDP for full fine-tunes. Ignored in a single process.
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    # Seconds a collective may wait for the other processes before the job fails (a hung or lost
    # process). Covers rank 0 writing a checkpoint while the others wait for it.
    collective_timeout_s: int = Field(900, ge=5, le=86_400)

    # -- checkpoints, evaluation, data checks ------------------------------------------------
    # Save a checkpoint every this many optimizer steps (None: only at the end). The final step
    # is always saved.
    checkpoint_every: int | None = Field(None, ge=1)
    # Keep this many most recent checkpoints; older ones are deleted once a newer one is complete.
    keep_last_n: int = Field(2, ge=1)
    # Evaluate on validation_file every this many steps (None: only at the end).
    eval_every: int | None = Field(None, ge=1)
    # Sequences per evaluation forward pass.
    eval_batch_size: int = Field(8, ge=1)
    # Longest accepted JSONL line in bytes; longer lines are rejected with their line number.
    max_line_bytes: int = Field(4 * 1024 * 1024, ge=1024)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_aliases(cls, value: object) -> object:
        return (
            {"float32": "fp32", "bfloat16": "bf16-mixed"}.get(value, value)
            if isinstance(value, str)
            else value
        )

    def device_micro_batch(self, world_size: int = 1) -> int:
        """Sequences per forward pass on one of `world_size` devices (before any out-of-memory halving)."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        per_device = -(-self.batch_size // world_size)
        return max(1, -(-per_device // self.gradient_accumulation_steps))

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainingConfig:
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps: {self.gradient_accumulation_steps} does not divide "
                f"batch_size {self.batch_size}"
            )
        if self.micro_batch_size is not None:
            if self.gradient_accumulation_steps != 1:
                raise ValueError(
                    "micro_batch_size: give micro_batch_size or gradient_accumulation_steps, not both"
                )
            if self.micro_batch_size > self.batch_size:
                raise ValueError(
                    f"micro_batch_size: {self.micro_batch_size} is larger than batch_size {self.batch_size}"
                )
        if self.lora is not None and self.precision == "bf16-pure":
            raise ValueError(
                "precision: bf16-pure is for full fine-tunes; with LoRA use bf16-mixed (the frozen base "
                "is bf16 already, the adapters and their optimizer state stay fp32)"
            )
        if self.lora is not None and self.distributed == "fsdp":
            raise ValueError(
                "distributed: fsdp shards full fine-tunes; LoRA jobs replicate the frozen base (ddp, or "
                "auto), since their adapters and gradients are small"
            )
        if self.eval_every is not None and self.validation_file is None:
            raise ValueError("eval_every: set validation_file too, or leave eval_every unset")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        return self

    def resolve_paths(self, base: Path) -> TrainingConfig:
        """Make relative file paths relative to `base` (the config file's folder)."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None or p.is_absolute() else base / p

        updates: dict[str, Any] = {
            "train_file": fix(self.train_file),
            "validation_file": fix(self.validation_file),
            "output_dir": fix(self.output_dir),
        }
        model_path = base / self.model
        if not Path(self.model).is_absolute() and (model_path.exists() or self.model.startswith(".")):
            updates["model"] = str(model_path)
        return self.model_copy(update={k: v for k, v in updates.items() if v is not None})


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the dotted field name."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}" if loc and not msg.startswith(f"{loc}:") else msg)
    return "\n".join(lines)


def parse_config(data: object) -> TrainingConfig:
    """Validate a decoded mapping; raise ConfigError naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of fields, got {type(data).__name__}")
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path) -> TrainingConfig:
    """Read a .json, .yaml or .yml config; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"config file {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}"
        ) from None
    return parse_config(data).resolve_paths(path.resolve().parent)
