"""Loading a base model and its tokenizer in the job's memory model, and wrapping it with LoRA.

A model is named by one string:
- a Hugging Face model directory (a tunepool checkpoint is one);
- a LoRA checkpoint directory (adapter_config.json): its base is loaded and the adapter merged;
- a `.gguf` file: transformers dequantises it;
- a hub id ("org/name"), served from the local cache only: nothing is ever downloaded.

Weights load in the dtype the job trains them in, straight onto the device (never an fp32 copy
built on the host first): fp32 master weights for fp32 and bf16-mixed full fine-tunes, bf16 for
bf16-pure, and for LoRA a frozen base in bf16 (or 4-bit NF4 with `lora.quantize`) under fp32
adapters. `base_dtype` is the dtype the base was stored in; checkpoints are saved in it.

`trust_remote_code` is never enabled (every transformers call below passes False): only architectures
that transformers ships can load, and a model's own Python files (`auto_map`) are never imported;
a model that cannot load without them is refused.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from worker.training.config import ConfigError, LoraConfig, TrainingConfig
from worker.training.lora import fold_dropout


class ModelLoadError(RuntimeError):
    """The model cannot be found or used; the message says which and why."""


@dataclass(frozen=True)
class Precision:
    """The memory model of one run (config `precision`, resolved for the device)."""

    name: str  # "fp32", "bf16-mixed" or "bf16-pure"
    param_dtype: torch.dtype  # trained parameters and their optimizer state
    compute_dtype: torch.dtype  # forward/backward matmuls (autocast when it differs from param_dtype)
    frozen_dtype: torch.dtype  # a LoRA job's frozen base

    @property
    def autocast(self) -> torch.dtype | None:
        return self.compute_dtype if self.compute_dtype != self.param_dtype else None


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bf16-mixed" if bf16 else "fp32"
    f32, bf16 = torch.float32, torch.bfloat16
    if name == "fp32":
        return Precision(name, f32, f32, f32)
    if name == "bf16-mixed":
        return Precision(name, f32, bf16, bf16)
    if name == "bf16-pure":
        return Precision(name, bf16, bf16, bf16)
    raise ConfigError(f"precision: unknown precision {name!r}")


@dataclass(frozen=True)
class HeadSpec:
    """How a model turns `h @ W^T + b` into its logits: z = softcap(logit_scale * (h W^T + b))."""

    logit_scale: float = 1.0
    softcap: float | None = None

    def describe(self) -> str:
        parts = [f"x{self.logit_scale:g}"] if self.logit_scale != 1.0 else []
        parts += [f"soft-cap {self.softcap:g}"] if self.softcap else []
        return ", ".join(parts) or "plain"


# Config attributes that scale final logits. The same name means "multiply" in one architecture
# and "divide" in another (Granite divides by logits_scaling, HyperCLOVAX multiplies by it), so
# both readings are candidates and the start-up self-check keeps the one the model's own logits
# agree with (worker/training/objective.py).
_SCALE_ATTRS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
_SOFTCAP_ATTRS = ("final_logit_softcapping", "logits_soft_cap")


def head_candidates(config: Any) -> list[HeadSpec]:
    """Every head transform the model's config could mean, the most likely first."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scales = [
        (float(v), 1.0 / float(v))
        for a in _SCALE_ATTRS
        if isinstance(v := getattr(text, a, None), int | float)
        and not isinstance(v, bool)
        and v not in (0, 1)
    ]
    caps = [
        float(v) for a in _SOFTCAP_ATTRS if isinstance(v := getattr(text, a, None), int | float) and v > 0
    ]
    softcaps: list[float | None] = [*caps[:1], None] if caps else [None]
    candidates = []
    for choice in itertools.product(*scales):
        scale = 1.0
        for factor in choice:
            scale *= factor
        candidates += [HeadSpec(scale, cap) for cap in softcaps]
    if HeadSpec() not in candidates:
        candidates.append(HeadSpec())
    return candidates


def _from_pretrained(source: str, **kwargs: Any) -> tuple[PreTrainedModel, Any]:
    common = {"trust_remote_code": False, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source, **common, gguf_file=kwargs.get("gguf_file"))
    model = AutoModelForCausalLM.from_pretrained(source, **common, **kwargs)
    return model, tokenizer


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    attn_implementation: str | None = None,
    quantization: Any = None,
) -> tuple[PreTrainedModel, Any]:
    """Load (model, tokenizer) in `dtype`, onto `device` (CPU when None); raise ModelLoadError."""
    hf_logging.disable_progress_bar()  # our own progress display is the one users read
    path = Path(spec).expanduser()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device is not None and device.type != "cpu":
        kwargs["device_map"] = {"": device}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs.setdefault("device_map", {"": device or torch.device("cpu")})
    try:
        if spec.endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"model: GGUF file {spec} does not exist")
            model, tokenizer = _from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
            # The weights are dequantised: drop every GGUF flag, so the model trains, saves and reloads
            # as a plain model (transformers' own remove_quantization_config).
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None and quantization is None:
                quantizer.remove_quantization_config(model)
        elif path.is_dir():
            if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
                model, tokenizer = _load_merged_adapter(path, dtype, device, attn_implementation)
            else:
                model, tokenizer = _from_pretrained(str(path), **kwargs)
        elif spec.startswith((".", "/", "~")) or path.exists():
            raise ModelLoadError(f"model: {spec} is not a model directory or a .gguf file")
        else:
            model, tokenizer = _from_pretrained(spec, **kwargs)
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
    if model.get_output_embeddings() is None:
        raise ModelLoadError(f"model: {spec!r} has no output projection (not a causal language model)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_config(spec: str) -> Any:
    """The base model's config without its weights (for building it on the meta device)."""
    path = Path(spec).expanduser()
    common = {"trust_remote_code": False, "local_files_only": True}
    if spec.endswith(".gguf"):
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **common)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return load_config(_adapter_base(path))
    return AutoConfig.from_pretrained(spec, **common)


def base_dtype(spec: str) -> torch.dtype:
    """The dtype the base model's weights are stored in (float32 for GGUF, which is dequantised)."""
    if spec.endswith(".gguf"):
        return torch.float32
    try:
        dtype = getattr(load_config(spec), "dtype", None)
    except (OSError, ValueError, KeyError):
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _adapter_base(path: Path) -> str:
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"model: LoRA adapter {path} does not name its base model")
    return str(base)


def _load_merged_adapter(
    path: Path, dtype: torch.dtype, device: torch.device | None, attn_implementation: str | None
) -> tuple[PreTrainedModel, Any]:
    from peft import PeftModel

    model, _ = load_model(
        _adapter_base(path), dtype=dtype, device=device, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return merged, tokenizer


def quantization_config(lora: LoraConfig | None, precision: Precision) -> Any:
    """bitsandbytes' 4-bit config for QLoRA, or None; a ConfigError where bitsandbytes cannot run."""
    if lora is None or lora.quantize is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            "lora.quantize: needs the bitsandbytes package on the worker (pip install bitsandbytes)"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=lora.quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision.compute_dtype,
    )


def apply_lora(model: PreTrainedModel, lora: LoraConfig, base_spec: str) -> Any:
    """Wrap `model` with trainable low-rank adapters (fp32); everything else is frozen."""
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
    peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    peft_model.peft_config["default"].base_model_name_or_path = base_spec
    return peft_model


def resolve_attention(name: str, device: torch.device, spec: str) -> str | None:
    """`attn_implementation: auto`: flash-attention 2 on CUDA where it is installed and the
    architecture supports it, else transformers' own default for the architecture (sdpa where it
    supports it, eager otherwise: Gemma-2's attention soft-capping, say)."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return None
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return None
    try:
        config = load_config(spec)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, OSError, ValueError):
        return None
    supported = getattr(
        model_class, "_supports_flash_attn", getattr(model_class, "_supports_flash_attn_2", False)
    )
    return "flash_attention_2" if supported else None


def prepare_model(
    cfg: TrainingConfig, resume_from: Path | None, precision: Precision, device: torch.device
) -> tuple[Any, Any]:
    """The model to train (on `device`) and its tokenizer; for one process or one DDP replica.

    A full fine-tune resumes from the checkpoint's own weights (the trainer then restores the exact
    master weights when the checkpoint was saved in a narrower dtype); LoRA loads the base model and
    then the checkpoint's adapter (or fresh adapters when there is no checkpoint).
    """
    attn = resolve_attention(cfg.attn_implementation, device, cfg.model)
    model: Any
    if cfg.lora is None:
        source = str(resume_from) if resume_from is not None else cfg.model
        model, tokenizer = load_model(
            source, dtype=precision.param_dtype, device=device, attn_implementation=attn
        )
    else:
        model, tokenizer = load_model(
            cfg.model,
            dtype=precision.frozen_dtype,
            device=device,
            attn_implementation=attn,
            quantization=quantization_config(cfg.lora, precision),
        )
        if cfg.lora.quantize is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if resume_from is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
        else:
            model = apply_lora(model, cfg.lora, cfg.model)
        for p in model.parameters():  # adapters train in fp32 whatever the base's dtype
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        fold_dropout(model)  # dropout inside A: no mask or input copy kept for backward (lora.py)
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    enable_checkpointing(model, cfg)
    return model, tokenizer


def enable_checkpointing(model: Any, cfg: TrainingConfig) -> None:
    if not cfg.gradient_checkpointing:
        return
    lm = causal_lm(model)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        lm.enable_input_require_grads()  # frozen embeddings: give checkpointed blocks a grad path


def causal_lm(model: Any) -> PreTrainedModel:
    """The transformers model under an optional PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert isinstance(inner, PreTrainedModel)
    return inner


def decoder_layers(lm: PreTrainedModel) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the units FSDP shards one by one)."""
    classes = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in classes]
    if not layers:
        raise ModelLoadError(
            f"model: cannot find the decoder layers of {type(lm).__name__} to shard; use distributed: ddp"
        )
    return layers


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)
