"""Loading a base model and its tokenizer, and wrapping it with LoRA.

A model is named by one string:
- a Hugging Face model directory (a tunepool checkpoint is one);
- a LoRA checkpoint directory (adapter_config.json): its base is loaded and the adapter merged;
- a `.gguf` file: transformers dequantises it to float32;
- a hub id ("org/name"), served from the local cache only: nothing is ever downloaded.

`trust_remote_code` is never enabled (every transformers call below passes False): only architectures
that transformers ships can load, and a model's own Python files (`auto_map`) are never imported;
a model that cannot load without them is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from worker.training.config import ConfigError, LoraConfig, TrainingConfig

# Config attributes of heads whose logits are not `hidden @ W^T + b`: the fused loss would be wrong.
_UNSUPPORTED_HEAD_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


class ModelLoadError(RuntimeError):
    """The model cannot be found or used; the message says which and why."""


def _from_pretrained(source: str, **kwargs: Any) -> tuple[PreTrainedModel, Any]:
    common = {"trust_remote_code": False, "local_files_only": True, **kwargs}
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **common)
    return model, tokenizer


def load_model(spec: str) -> tuple[PreTrainedModel, Any]:
    """Load (model, tokenizer) in float32 on the CPU; raise ModelLoadError with one clear message."""
    hf_logging.disable_progress_bar()  # our own progress display is the one users read
    path = Path(spec).expanduser()
    try:
        if spec.endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"model: GGUF file {spec} does not exist")
            model, tokenizer = _from_pretrained(str(path.parent), gguf_file=path.name)
            # The weights are dequantised to float32: drop every GGUF flag, so the model trains, saves
            # and reloads as a plain float32 model (transformers' own remove_quantization_config).
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:
                quantizer.remove_quantization_config(model)
        elif path.is_dir():
            if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
                model, tokenizer = _load_merged_adapter(path)
            else:
                model, tokenizer = _from_pretrained(str(path))
        elif spec.startswith((".", "/", "~")) or path.exists():
            raise ModelLoadError(f"model: {spec} is not a model directory or a .gguf file")
        else:
            model, tokenizer = _from_pretrained(spec)
    except ModelLoadError:
        raise
    except OSError as err:
        if path.is_dir():  # a local directory with a missing or broken file: not a download problem
            raise ModelLoadError(f"model: cannot load the model directory {spec}: {err}") from None
        raise ModelLoadError(
            f"model: cannot load {spec!r} without downloading it (a directory, a .gguf file, or a hub id "
            f"already in the local Hugging Face cache): {err}"
        ) from None
    except (ValueError, KeyError, ImportError) as err:
        if "trust_remote_code" in str(err):  # transformers' advice to enable it is not ours to give
            raise ModelLoadError(
                f"model: {spec!r} needs its own Python code to load (auto_map in its config or "
                "tokenizer_config.json); tunepool never runs a model's code: use an architecture that "
                "transformers ships"
            ) from None
        raise ModelLoadError(f"model: {spec!r} is not a supported causal language model: {err}") from None
    _check_supported(model, spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_merged_adapter(path: Path) -> tuple[PreTrainedModel, Any]:
    from peft import PeftModel

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"model: LoRA adapter {path} does not name its base model")
    model, _ = load_model(str(base))
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return merged, tokenizer


def _check_supported(model: PreTrainedModel, spec: str) -> None:
    config = model.config.get_text_config()
    for attr in _UNSUPPORTED_HEAD_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ModelLoadError(
                f"model: {spec!r} scales its logits ({attr}={value}), which is not supported"
            )
    if model.get_output_embeddings() is None:
        raise ModelLoadError(f"model: {spec!r} has no output projection (not a causal language model)")


def apply_lora(model: PreTrainedModel, lora: LoraConfig, base_spec: str) -> Any:
    """Wrap `model` with trainable low-rank adapters; everything else is frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model.config.name_or_path = base_spec  # recorded in adapter_config.json as the base model
    peft_model = get_peft_model(model, peft_config)
    peft_model.peft_config["default"].base_model_name_or_path = base_spec
    return peft_model


def prepare_model(cfg: TrainingConfig, resume_from: Path | None) -> tuple[Any, Any]:
    """The model to train and its tokenizer, on the CPU.

    A full fine-tune resumes from the checkpoint's own weights; LoRA loads the base model and then
    the checkpoint's adapter (or fresh adapters when there is no checkpoint).
    """
    source = str(resume_from) if resume_from is not None and cfg.lora is None else cfg.model
    model: Any
    model, tokenizer = load_model(source)
    if cfg.lora is not None and resume_from is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
    elif cfg.lora is not None:
        model = apply_lora(model, cfg.lora, cfg.model)
    if cfg.gradient_checkpointing:
        lm = causal_lm(model)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            lm.enable_input_require_grads()  # frozen embeddings: give checkpointed blocks a grad path
    return model, tokenizer


def causal_lm(model: Any) -> PreTrainedModel:
    """The transformers model under an optional PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert isinstance(inner, PreTrainedModel)
    return inner


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but no CUDA device is available")
    return torch.device(name)
