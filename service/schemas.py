"""API schemas, one per direction: requests (`JobCreate`) are separate from responses (`Job`).

Response shapes follow OpenAI's objects field for field (so the official SDK parses them), with
tunepool's extensions added as extra fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

Auto = Literal["auto"]
POOL_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # pool names appear in queue names: pool.<name>
MAX_JOB_GPUS = 64  # a job's gpus: all on one node, so a node's slots bound it long before this
PoolName = Annotated[str, StringConstraints(pattern=POOL_PATTERN)]

# Defaults that "auto" resolves to. The learning rate is the DFT paper's (5e-5) times the multiplier.
BASE_LEARNING_RATE = 5e-5
AUTO_N_EPOCHS = 3
AUTO_BATCH_SIZE = 8


def not_a_boolean(value: object) -> object:
    """A `mode="before"` check for number fields: pydantic would take JSON true/false as 1 and 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def numbers_not_booleans(*boolean_fields: str) -> Any:
    """`not_a_boolean` for every field of a model but `boolean_fields` (declared `strict=True`, so
    they take JSON true/false only, not 1 or "yes")."""

    def check(cls: type[BaseModel], value: object, info: ValidationInfo) -> object:
        return value if info.field_name in boolean_fields else not_a_boolean(value)

    return field_validator("*", mode="before")(check)


class LoraIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] | Literal["all-linear"]
    ) = "all-linear"
    merge: bool = False
    quantize: Literal["nf4"] | None = Field(
        None, description="QLoRA: the frozen base in 4-bit NormalFloat (bitsandbytes); needs a CUDA GPU"
    )

    _numbers = field_validator("r", "alpha", "dropout", mode="before")(not_a_boolean)


class Hyperparameters(BaseModel):
    """OpenAI's three knobs ("auto" or a number) plus tunepool's trainer settings."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = Field("auto", description="passes over the training data (1-50)")
    batch_size: int | Auto = Field("auto", description="sequences per optimizer step (1-1024)")
    learning_rate_multiplier: float | Auto = Field("auto", description=f"times {BASE_LEARNING_RATE}")
    learning_rate: float | None = Field(None, gt=0, le=1.0, description="explicit peak learning rate")
    max_seq_length: int | None = Field(None, ge=8, le=131072)
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] | None = None
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(None, gt=0.0, le=1e6)
    gradient_accumulation_steps: int | None = Field(None, ge=1, le=1024)
    overlength: Literal["truncate", "drop"] | None = None
    checkpoint_every: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)
    lora: LoraIn | None = None
    # GPU-node settings of the trainer (worker/training/config.py has a comment on each).
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-pure"] | None = Field(
        None, description="auto (bf16-mixed on a bf16 GPU, else fp32), fp32, bf16-mixed or bf16-pure"
    )
    gradient_checkpointing: bool | None = Field(
        None, strict=True, description="recompute activations in backward: less memory, more time"
    )
    micro_batch_size: int | None = Field(
        None, ge=1, le=65536, description="sequences per forward pass per device (no accumulation steps)"
    )
    loss_chunk_size: int | None = Field(
        None, ge=1, le=1_048_576, description="trained tokens per chunk of the fused loss"
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] | None = None
    packing: bool | None = Field(
        None, strict=True, description="padding-free batches (the sequences concatenated)"
    )
    chat_template: str | None = Field(
        None, min_length=1, max_length=200_000, description="a Jinja chat template replacing the model's"
    )
    distributed: Literal["auto", "ddp", "fsdp"] | None = Field(
        None, description="how the devices of one job share it: auto, ddp or fsdp"
    )

    _numbers = numbers_not_booleans("gradient_checkpointing", "packing")

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 50:
            raise ValueError("must be 'auto' or an integer from 1 to 50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("must be 'auto' or an integer from 1 to 1024")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 < v <= 100:
            raise ValueError("must be 'auto' or a number in (0, 100]")
        return v


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """`{"type": "supervised"}` is plain SFT; `{"type": "dft"}` is Dynamic Fine-Tuning."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dft"]
    supervised: MethodParams | None = None
    dft: MethodParams | None = None

    @model_validator(mode="after")
    def _matching_block(self) -> Method:
        other = "dft" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} given with method.type={self.type!r}")
        return self


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m",
                    "training_file": "file-abc123",
                    "method": {
                        "type": "dft",
                        "dft": {"hyperparameters": {"n_epochs": 1, "learning_rate": 5e-5}},
                    },
                    "suffix": "math-dft",
                },
                {
                    "model": "smollm2-135m",
                    "training_file": "file-abc123",
                    "validation_file": "file-def456",
                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 16}}},
                    "suffix": "math-sft",
                    "pool": "default",
                    "priority": 5,
                },
            ]
        },
    )

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="legacy: use method.*.hyperparameters")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = Field(
        None, description="up to 64 of A-Z a-z 0-9 . _ -, added to the fine-tuned model's name"
    )
    metadata: dict[str, str] | None = Field(None, description="up to 16 string pairs")
    integrations: list[Any] | None = None
    pool: PoolName | None = None
    priority: int = Field(0, ge=-100, le=100)
    gpus: int = Field(
        1,
        ge=1,
        le=MAX_JOB_GPUS,
        description="extension: GPUs of one node the job trains on (torchrun for more than one); at most "
        "the slots of the pool's largest worker",
    )
    preemptible: bool = Field(
        True,
        description="extension: false exempts the job from preemption (fair share, guarantees, its team's "
        "higher-priority jobs), where the team's admin settings allow it",
    )

    _numbers = field_validator("seed", "priority", "gpus", mode="before")(not_a_boolean)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 keys")
        for key, value in v.items():
            if not 1 <= len(key) <= 64 or len(value) > 512:
                raise ValueError("keys are 1-64 characters, values at most 512")
        return v

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("integrations are not supported")
        return v


# -- responses --------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    format: str | None = Field(None, description="chat | prompt_completion (tunepool)")
    n_examples: int | None = Field(None, description="valid examples (tunepool)")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    steps_completed: int
    total_steps: int | None
    trained_tokens: int | None
    tokens_per_sec: float | None


class Job(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None
    method: dict[str, Any]
    user_provided_suffix: str | None
    # tunepool extensions
    pool: str
    priority: int
    gpus: int
    attempt: int
    cancel_requested: bool
    pause_requested: bool = False  # running, asked to pause: it checkpoints its step, then `paused`
    preemptible: bool = True
    preemptions: int = 0  # times it made way for another job (each resumed from its checkpoint)
    progress: Progress
    queue_position: int | None = None
    queue_reason: str | None = None  # queued: why it waits (worker/scheduling.py)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class MetricRow(BaseModel):
    step: int
    attempt: int
    data: dict[str, Any]


class MetricsList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricRow]
    has_more: bool


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
