"""Checkpoints: Hugging Face weights plus everything an exact resume needs, written atomically.

Layout of `output_dir/checkpoints/step-NNNNNN/`:
- full fine-tune: `config.json`, `model.safetensors`, generation config, tokenizer (with its chat
  template): loadable by plain `AutoModelForCausalLM.from_pretrained`, in the base model's own
  dtype (a bf16 base gives a bf16 checkpoint). When training keeps wider master weights (fp32
  under bf16-mixed), they are saved too, in `exact_weights.safetensors`, for an exact resume;
- LoRA: the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`, fp32) and the
  tokenizer; with `lora.merge`, also `merged/`, the full merged model in the base's dtype;
- `trainer_state.pt`: optimizer state keyed by parameter name (consolidated over the ranks of a
  multi-GPU job, so a job resumes on any number of GPUs), scheduler, step and counters (loadable
  with `torch.load(weights_only=True)`);
- `tunepool_checkpoint.json`: written last; a directory without it is not a checkpoint.

A checkpoint is built in `.tmp-step-NNNNNN`, flushed to disk, then renamed: a kill at any moment
leaves the previous checkpoints intact and at worst a `.tmp-*` directory, removed on the next start.
Only rank 0 of a multi-GPU job writes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from worker.training.config import TrainingConfig

STATE_FILE = "trainer_state.pt"
EXACT_WEIGHTS_FILE = "exact_weights.safetensors"
MARKER_FILE = "tunepool_checkpoint.json"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(_PREFIX) and (child / MARKER_FILE).is_file():
            try:
                found.append((int(child.name.removeprefix(_PREFIX)), child))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Delete what a kill in the middle of a save left behind; returns what was removed."""
    root = checkpoints_dir(output_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX) or (
                child.name.startswith(_PREFIX) and not (child / MARKER_FILE).is_file()
            ):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: Path,
    step: int,
    write_weights: Callable[[Path], None],
    tokenizer: Any,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    *,
    keep_last_n: int,
) -> Path:
    """Write checkpoint `step` atomically (weights by `write_weights(dir)`), then delete all but the
    newest `keep_last_n`."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    write_weights(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / MARKER_FILE).write_text(json.dumps({"step": step, **meta}, indent=2, default=str))
    _fsync_tree(tmp)

    if final.exists():  # the same step saved again (e.g. a resumed run's final step): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)

    for _, old in list_checkpoints(output_dir)[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def output_key(lm: Any) -> str | None:
    """The state-dict key of the output projection's weight (to drop when tied to the embeddings)."""
    head = lm.get_output_embeddings()
    for name, module in lm.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


def write_full_model(
    directory: Path, lm: Any, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, tokenizer: Any = None
) -> None:
    """`lm`'s architecture with the weights of `state_dict` (full, on the CPU), saved in `dtype`
    (the base model's); weights trained in a wider dtype also go to EXACT_WEIGHTS_FILE."""
    tied = bool(getattr(lm.config.get_text_config(), "tie_word_embeddings", False))
    key = output_key(lm)
    weights = {k: v for k, v in state_dict.items() if not (tied and k == key)}
    exact = {k: v.contiguous() for k, v in weights.items() if v.is_floating_point() and v.dtype != dtype}
    narrow = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    lm.save_pretrained(directory, state_dict=narrow)
    # transformers writes the in-memory model's dtype; the files hold `dtype`, which is what
    # from_pretrained(dtype="auto") must load them as
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if exact:
        save_file(exact, str(directory / EXACT_WEIGHTS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def exact_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The master weights a full-fine-tune checkpoint saved beside its narrower HF weights (or {})."""
    path = checkpoint / EXACT_WEIGHTS_FILE
    return load_file(str(path)) if path.is_file() else {}


def write_lora(directory: Path, model: Any, tokenizer: Any, *, merge: bool, dtype: torch.dtype) -> None:
    """The adapter; with `merge`, also the merged full model in the base's dtype under `merged/`."""
    model.save_pretrained(directory)
    if not merge:
        return
    if getattr(model.get_base_model(), "is_quantized", False):
        # QLoRA: merging into 4-bit weights would round the result to 4 bits. The base is loaded
        # again in its own dtype (on the CPU) and the adapter just written is merged into it.
        from peft import PeftModel

        from worker.training.model import load_model

        base, _ = load_model(model.peft_config["default"].base_model_name_or_path, dtype=dtype)
        merged = PeftModel.from_pretrained(base, str(directory)).merge_and_unload()
    else:
        # Merge a copy: merging in place and unmerging would not give back bit-identical weights.
        merged = copy.deepcopy(model).merge_and_unload().to(dtype)
    merged.save_pretrained(directory / "merged")
    tokenizer.save_pretrained(directory / "merged")
    del merged


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # mmap: the tensors are read when used (rank 0 only, under FSDP), not copied into memory by every rank
    state: dict[str, Any] = torch.load(
        checkpoint / STATE_FILE, map_location="cpu", weights_only=True, mmap=True
    )
    return state


# Config fields that do not change the trajectory: a resume may change them.
RESUME_FREE_FIELDS = {
    "output_dir",
    "device",
    "gradient_accumulation_steps",
    "micro_batch_size",
    "packing",
    "attn_implementation",
    "distributed",
    "collective_timeout_s",
    "loss_chunk_size",
    "gradient_checkpointing",
    "checkpoint_every",
    "keep_last_n",
    "eval_every",
    "eval_batch_size",
    "max_line_bytes",
    "train_file",
    "validation_file",
}


def _file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(cfg: TrainingConfig) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming from it."""
    return {
        "config": cfg.model_dump(mode="json", exclude=RESUME_FREE_FIELDS),
        "train_file_sha256": _file_digest(cfg.train_file),
        "validation_file_sha256": _file_digest(cfg.validation_file),
    }


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the config fields and data files that differ; empty when the runs match."""
    fields = {*saved["config"], *current["config"]}
    changed = [k for k in fields if saved["config"].get(k) != current["config"].get(k)]
    for key in ("train_file_sha256", "validation_file_sha256"):
        if saved[key] != current[key]:
            changed.append(key.removesuffix("_sha256"))
    return sorted(changed)
