"""The GPU checks of the training engine, in one script for one GPU (sized for an H200, < 8 minutes).

No network and no model files are needed: every model is built from its architecture's config with
random weights (bench/_synthetic.py), saved as a Hugging Face directory and trained by the real
`worker.training.trainer.Trainer`. Parts, each in its own try/except (a failure is reported with its
error text and the other parts still run):

- loss_check (a): the fused loss (DFT) against float64, fp32 inputs (fp32 products, TF32 off) and bf16
  inputs (bf16 products with fp32 accumulation), each with and without a soft-cap of 30; plus the
  repository's CUDA loss tests (`pytest tests/worker/training/test_loss.py -k cuda`) where pytest
  is installed. Tolerances: fp32 1e-5 relative (loss, gradients); bf16 2e-2 on the loss and cosine
  > 0.999 for the gradients, and on CUDA the bf16 products must be the ones used.
- trainer_step (b): one DFT optimizer step of a SmolLM2-135M-shaped model, batch 4 x 256, under
  fp32, bf16-mixed and bf16-pure: loss, gradient norm, finite or not.
- loss_bench (c): forward + backward of our fused loss vs the naive logits + log-softmax DFT, n=8192
  tokens, bf16 inputs, at SmolLM2's head (d=576, V=49152) and Qwen2.5-1.5B's (d=1536, V=151936):
  best time of 3 and peak memory above the inputs.
- full_finetune (d): a Qwen2.5-1.5B-shaped full fine-tune (1.54B parameters, tied embeddings), batch
  `--batch` x `--seq` (default 8 x 1024) as one micro-batch, per precision, gradient checkpointing
  off and on: after setup (which runs the preflight pass) and one untimed step, `--steps` timed
  steps: mean step time, processed tokens/s, peak `max_memory_allocated` (weights and optimizer
  state included) and what was allocated before the steps. Then LoRA (r=16, all-linear) in fp32 and
  bf16-mixed, for the LoRA bf16/fp32 peak ratio bench/memory_model.py measures on the CPU.
  Configurations that would run past the time budget (`--budget-s`) are skipped, and say so.
- mfu (e): model FLOPs utilisation of (d): 6 x parameters x processed tokens / step time / the
  GPU's dense bf16 peak (a small table by device name, the figure used is printed).

`--smoke` runs every part on the CPU with tiny shapes (a few layers, small vocabularies, a few
tokens): it checks the code paths, not the numbers (tests/test_bench_gpu_check.py runs it). Without
CUDA and without --smoke it prints a line saying so and exits 0.

Output: one JSON line on stdout (progress on stderr). Run from the repository root:

    python -m bench.gpu_check            # on the GPU machine
    .venv/bin/python -m bench.gpu_check --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), by a substring of torch.cuda.get_device_name();
# the first match wins (so "H100 PCIe" before "H100").
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # SXM; the NVL part is lower
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)
PARTS = ("loss_check", "trainer_step", "loss_bench", "full_finetune", "mfu")
# what the parts import (worker.training needs pydantic and PyYAML too); None: not installed
PACKAGES = ("transformers", "peft", "accelerate", "pydantic", "PyYAML", "safetensors", "tokenizers", "pytest")


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def peak_flops(device_name: str) -> tuple[float | None, str | None]:
    for key, flops in PEAK_BF16:
        if key.lower() in device_name.lower():
            return flops, key
    return None, None


def mfu(finetune: dict[str, Any], device_name: str) -> dict[str, Any]:
    peak, matched = peak_flops(device_name)
    out: dict[str, Any] = {
        "formula": "6 * params * processed_tokens / step_s / peak_bf16_flops",
        "device": device_name,
        "peak_bf16_flops": peak,
        "peak_matched": matched,
        "configs": {},
    }
    for name, r in finetune.get("configs", {}).items():
        if "step_s" not in r:
            out["configs"][name] = {"skipped": r.get("skipped") or r.get("error")}
            continue
        if r["trainable_params"] != r["params"]:  # LoRA: no weight gradients of the base, not 6N
            out["configs"][name] = {"skipped": "LoRA (6N counts the frozen base's weight gradients)"}
            continue
        achieved = 6.0 * r["params"] * r["processed_tokens_per_step"] / r["step_s"]
        out["configs"][name] = {
            "achieved_tflops": achieved / 1e12,
            "mfu": achieved / peak if peak else None,
        }
    return out


def run_part(name: str, fn: Callable[[], dict[str, Any]], free: Callable[[], None]) -> dict[str, Any]:
    log(f"{name} ...")
    t0 = time.perf_counter()
    try:
        result = {"ok": True, **fn()}
    except Exception as err:
        result = {
            "ok": False,
            "error": f"{type(err).__name__}: {str(err)[:1000]}",
            "traceback": traceback.format_exc()[-3000:],
        }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    free()
    log(f"{name}: {'ok' if result['ok'] else result['error']} ({result['seconds']} s)")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Prints one JSON line.")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU with tiny shapes")
    p.add_argument("--batch", type=int, default=None, help="full fine-tune sequences per step (8; smoke 2)")
    p.add_argument(
        "--seq", type=int, default=None, help="full fine-tune tokens per sequence (1024; smoke 32)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (3; smoke 1)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip (d) configurations past this (420 s)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    args = p.parse_args(argv)
    if unknown := set(args.parts.split(",")) - set(PARTS):
        p.error(f"--parts: unknown {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import torch

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {
        "bench": "gpu_check",
        "smoke": args.smoke,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python": platform.python_version(),
        "packages": package_versions(),
    }
    if not cuda and not args.smoke:
        out.update(cuda=False, error="no CUDA device (run on a GPU machine, or use --smoke)")
        print(json.dumps(out), flush=True)
        return 0

    from bench import _gpu_parts as parts

    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    name = "cpu" if args.smoke else torch.cuda.get_device_name(device)
    batch = args.batch or (2 if args.smoke else 8)
    seq = args.seq or (32 if args.smoke else 1024)
    out.update(device=name, cuda=cuda)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    wanted = args.parts.split(",")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = parts.Ctx(
            device=device,
            smoke=args.smoke,
            workdir=Path(tmp),
            deadline=started + args.budget_s,
            steps=args.steps or (1 if args.smoke else 3),
        )
        jobs: dict[str, Callable[[], dict[str, Any]]] = {
            "loss_check": lambda: parts.loss_check(ctx),
            "trainer_step": lambda: parts.trainer_step(ctx),
            "loss_bench": lambda: parts.loss_bench(ctx),
            "full_finetune": lambda: parts.full_finetune(ctx, batch, seq),
            "mfu": lambda: mfu(results.get("full_finetune", {}), name),
        }
        for part in PARTS:
            if part in wanted:
                results[part] = run_part(part, jobs[part], ctx.free)
    out["parts"] = results
    out["failed_parts"] = [p for p, r in results.items() if not r["ok"]]
    out["failed_checks"] = [p for p, r in results.items() if r.get("passed") is False]
    out["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
