"""A job's hyperparameters: "auto" resolved, impossible combinations refused, the pool's GPUs checked.

The trainer (worker/training/config.py) refuses the same combinations when it starts; checking them
here turns a job that would fail on a worker into a 400 whose `param` names the field at fault.
Nothing here imports torch or transformers: a chat template is compiled with jinja2 alone, in the
sandboxed environment transformers renders templates in.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import APIError
from service.models import Worker
from service.schemas import AUTO_BATCH_SIZE, AUTO_N_EPOCHS, BASE_LEARNING_RATE, Hyperparameters

# Given values go to the job (and the trainer's config.json) under the same name; unset ones stay
# out, so the trainer's own defaults apply.
_PASSED_THROUGH = (
    "max_seq_length", "max_steps", "warmup_ratio", "lr_scheduler", "weight_decay", "max_grad_norm",
    "gradient_accumulation_steps", "overlength", "checkpoint_every", "eval_every", "precision",
    "gradient_checkpointing", "micro_batch_size", "loss_chunk_size", "attn_implementation", "packing",
    "chat_template", "distributed",
)  # fmt: skip


def _refuse(param: str, field: str, why: str) -> APIError:
    return APIError(400, f"{param}.{field}: {why}", param=f"{param}.{field}")


def resolve_hyperparameters(hp: Hyperparameters, *, has_validation: bool, param: str) -> dict[str, Any]:
    """Every trainer setting with "auto" resolved; the job stores and echoes this."""
    if hp.learning_rate is not None and hp.learning_rate_multiplier != "auto":
        raise _refuse(param, "learning_rate", "give learning_rate or learning_rate_multiplier, not both")
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
    batch_size = AUTO_BATCH_SIZE if hp.batch_size == "auto" else int(hp.batch_size)
    resolved: dict[str, Any] = {
        "n_epochs": AUTO_N_EPOCHS if hp.n_epochs == "auto" else int(hp.n_epochs),
        "batch_size": batch_size,
        "learning_rate_multiplier": multiplier,
        "learning_rate": hp.learning_rate
        if hp.learning_rate is not None
        else BASE_LEARNING_RATE * multiplier,
    }
    _check_combinations(hp, batch_size, has_validation, param)
    for field in _PASSED_THROUGH:
        value = getattr(hp, field)
        if value is not None:
            resolved[field] = value
    if hp.lora is not None:
        resolved["lora"] = hp.lora.model_dump(exclude_none=True)  # quantize only when asked for
    return resolved


def _check_combinations(hp: Hyperparameters, batch_size: int, has_validation: bool, param: str) -> None:
    """The trainer's refusals (worker/training/config.py), with `batch_size` after "auto"."""
    if hp.gradient_accumulation_steps is not None and batch_size % hp.gradient_accumulation_steps:
        raise _refuse(param, "gradient_accumulation_steps", f"must divide batch_size {batch_size}")
    if hp.micro_batch_size is not None:
        if hp.gradient_accumulation_steps is not None:
            raise _refuse(
                param,
                "micro_batch_size",
                "give micro_batch_size or gradient_accumulation_steps, not both "
                "(the accumulation steps follow from batch_size / micro_batch_size)",
            )
        if hp.micro_batch_size > batch_size:
            raise _refuse(
                param, "micro_batch_size", f"{hp.micro_batch_size} is larger than batch_size {batch_size}"
            )
    if hp.eval_every is not None and not has_validation:
        raise _refuse(param, "eval_every", "needs a validation_file")
    if hp.lora is not None and hp.precision == "bf16-pure":
        raise _refuse(
            param,
            "precision",
            "bf16-pure is for full fine-tunes; with lora use bf16-mixed (the frozen base is bf16 "
            "already, the adapters and their optimizer state stay fp32)",
        )
    if hp.lora is not None and hp.lora.quantize is not None and hp.distributed == "fsdp":
        raise _refuse(
            param,
            "lora.quantize",
            "a quantized (QLoRA) base is not sharded: use distributed ddp or auto, not fsdp",
        )
    if hp.lora is not None and hp.distributed == "fsdp":
        raise _refuse(
            param,
            "distributed",
            "fsdp shards full fine-tunes; lora jobs replicate the frozen base (ddp, or auto)",
        )
    if hp.chat_template is not None and (problem := chat_template_problem(hp.chat_template)):
        raise _refuse(param, "chat_template", f"not a valid Jinja template: {problem}")


# -- chat templates ----------------------------------------------------------------------------


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant tokens); here a
    block that renders its body, so that templates using it compile."""

    tags = {"generation"}  # noqa: RUF012 (declared as jinja2 declares it, a set)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> Any:
        return caller()


@lru_cache(maxsize=1)
def _template_env() -> ImmutableSandboxedEnvironment:
    # As transformers builds its own (chat_template_utils.py): trim_blocks, lstrip_blocks, loop controls.
    return ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag]
    )


def chat_template_problem(template: str) -> str | None:
    """Why `template` does not compile as a Jinja template (with its line), or None if it does."""
    try:
        _template_env().from_string(template)
    except TemplateError as err:
        line = getattr(err, "lineno", None)
        return f"{err.message or type(err).__name__}" + (f" (line {line})" if line else "")
    except RecursionError:  # the parser and code generator recurse once per level of nesting
        return "nested too deeply"
    except SyntaxError as err:  # Python's, in the generated code (its line is not the template's)
        return str(err.msg)  # e.g. "'break' outside loop"
    except Exception as err:  # whatever else jinja2 raises while compiling: it did not compile
        return f"{type(err).__name__}: {err}"
    return None


# -- what the pool's workers can do ------------------------------------------------------------


def check_pool_capabilities(session: Session, pool: str, resolved: dict[str, Any], param: str) -> None:
    """Refuse what no worker of `pool` can run: QLoRA and flash-attention need a CUDA GPU. Only the
    registered workers are known; a pool with none (or with any GPU worker) is not refused."""
    lora = resolved.get("lora") or {}
    needs = []
    if lora.get("quantize") is not None:
        needs.append(("lora.quantize", f"QLoRA (lora.quantize {lora['quantize']!r})"))
    if resolved.get("attn_implementation") == "flash_attention_2":
        needs.append(("attn_implementation", "flash_attention_2"))
    if not needs:
        return
    gpus = set(session.scalars(select(Worker.gpu_name).where(Worker.pool == pool).distinct()))
    if gpus != {"cpu"}:  # no worker registered (nothing known), or a GPU among them
        return
    field, what = needs[0]
    raise APIError(
        400,
        f"{param}.{field}: {what} needs a CUDA GPU, and pool {pool!r} has CPU workers only "
        "(send the job to a pool with GPU workers)",
        param=f"{param}.{field}",
        code="unsupported_by_pool",
    )
