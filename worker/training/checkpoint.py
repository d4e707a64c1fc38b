"""Checkpoints: Hugging Face weights plus everything an exact resume needs, written atomically.

Layout of `output_dir/checkpoints/step-NNNNNN/`:
- full fine-tune: `config.json`, `model.safetensors`, generation config, tokenizer (with its chat
  template): loadable by plain `AutoModelForCausalLM.from_pretrained`;
- LoRA: the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer;
  with `lora.merge`, also `merged/`, the full merged model;
- `trainer_state.pt`: optimizer, scheduler, RNG states, step and counters (loadable with
  `torch.load(weights_only=True)`);
- `tunepool_checkpoint.json`: written last; a directory without it is not a checkpoint.

A checkpoint is built in `.tmp-step-NNNNNN`, flushed to disk, then renamed: a kill at any moment
leaves the previous checkpoints intact and at worst a `.tmp-*` directory, removed on the next start.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.training.config import TrainingConfig
from worker.training.model import causal_lm

STATE_FILE = "trainer_state.pt"
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


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    model: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    *,
    is_lora: bool,
    merge_lora: bool,
    keep_last_n: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last_n`."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    if is_lora:
        model.save_pretrained(tmp)  # the adapter only
        if merge_lora:
            # Merge a copy: merging in place and unmerging would not give back bit-identical weights.
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
            del merged
    else:
        causal_lm(model).save_pretrained(tmp)
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


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    return state


# Config fields that do not change the trajectory: a resume may change them.
RESUME_FREE_FIELDS = {
    "output_dir",
    "device",
    "gradient_accumulation_steps",
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
