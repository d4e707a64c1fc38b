"""The parts of bench/gpu_check.py, each a function of one `Ctx` returning a JSON-able dict.

On CUDA every timing is bracketed by `torch.cuda.synchronize()`, every memory figure starts from
`torch.cuda.reset_peak_memory_stats()` (peaks are `max_memory_allocated()` minus what was allocated
when the measurement began, unless said otherwise), and memory is released between measurements.
On the CPU (`--smoke`) the same code runs with tiny shapes and no memory figures (None)."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench._synthetic import (
    QWEN25_1_5B,
    SMOLLM2_135M,
    build_tokenizer,
    model_config,
    write_model_dir,
    write_prompt_completion,
)

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
PRECISIONS = ("fp32", "bf16-mixed", "bf16-pure")
TINY = {"num_hidden_layers": 2, "vocab_size": 512}  # --smoke: a few layers, a small vocabulary
TINY_QWEN = {**TINY, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4}


@dataclass
class Ctx:
    device: torch.device
    smoke: bool
    workdir: Path
    deadline: float  # time.monotonic() after which optional work is skipped
    steps: int = 3  # timed optimizer steps per full fine-tune configuration
    tokenizer: Any = field(default_factory=build_tokenizer)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def start_peak(self) -> int:
        """Reset the peak statistics; the bytes allocated now (0 on the CPU)."""
        self.free()
        if not self.cuda:
            return 0
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_mib(self, since: int = 0) -> float | None:
        return (torch.cuda.max_memory_allocated(self.device) - since) / MIB if self.cuda else None


# -- (a) the fused loss against float64 ------------------------------------------------------------


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-300))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _loss_case(ctx: Ctx, dtype: torch.dtype, softcap: float | None) -> dict[str, Any]:
    from worker.training.loss import fused_linear_cross_entropy
    from worker.training.loss_chunks import products_for

    n, d, vocab = (64, 32, 512) if ctx.smoke else (512, 128, 4096)
    g = torch.Generator(device="cpu").manual_seed(7)
    w = (torch.randn(vocab, d, generator=g) * 0.3).to(ctx.device, dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g).to(ctx.device)
    # a spread of target probabilities (h leans towards W[y] by a random amount)
    h0 = (
        torch.randn(n, d, generator=g) + torch.rand(n, 1, generator=g) * 3 * w.detach().float().cpu()[y.cpu()]
    )
    h = h0.to(ctx.device, dtype).requires_grad_()
    loss, _ = fused_linear_cross_entropy(h, w, y, mode="dft", chunk_size=128, softcap=softcap)
    loss.backward()
    assert h.grad is not None and w.grad is not None
    ours = (loss.detach(), h.grad, w.grad)
    # the formula in float64 on the same (rounded) inputs
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    z = h64 @ w64.t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
    ref = -(log_p.exp().detach() * log_p).sum() / n
    ref.backward()
    assert h64.grad is not None and w64.grad is not None
    loss_rel = abs(float(ours[0]) - ref.item()) / abs(ref.item())
    out: dict[str, Any] = {
        "products": str(products_for(h, w).dtype).removeprefix("torch."),
        "loss_rel_err": loss_rel,
        "grad_h_rel_err": _rel(ours[1], h64.grad),
        "grad_w_rel_err": _rel(ours[2], w64.grad),
        "grad_h_cosine": _cosine(ours[1], h64.grad),
        "grad_w_cosine": _cosine(ours[2], w64.grad),
    }
    if dtype == torch.float32:
        tol = 1e-5
        out["passed"] = loss_rel <= tol and out["grad_h_rel_err"] <= tol and out["grad_w_rel_err"] <= tol
    else:  # bf16 inputs carry ~3 significant digits; accumulation is fp32
        ok = loss_rel <= 2e-2 and out["grad_h_cosine"] > 0.999 and out["grad_w_cosine"] > 0.999
        # on CUDA the bf16 path is the reduced-precision products (no fp32 copy of W)
        out["passed"] = ok and (not ctx.cuda or out["products"] == "bfloat16")
    return out


def _pytest_cuda(timeout: float) -> dict[str, Any]:
    """The repository's own CUDA loss tests, where pytest is installed."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"ran": False, "reason": "pytest is not installed"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda"]
    cmd.append("tests/worker/training/test_loss.py")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ran": True, "rc": None, "summary": f"timed out after {timeout:.0f} s", "passed": False}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr[-500:]
    return {"ran": True, "rc": proc.returncode, "summary": summary, "passed": proc.returncode == 0}


def loss_check(ctx: Ctx) -> dict[str, Any]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the fp32 path in fp32, not TF32
    try:
        cases = {
            f"{name}_{'softcap30' if cap else 'plain'}": _loss_case(ctx, dtype, cap)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            for cap in (None, 30.0)
        }
    finally:
        torch.set_float32_matmul_precision(previous)
    tests = _pytest_cuda(timeout=max(30.0, min(180.0, ctx.deadline - time.monotonic() - 240)))
    passed = all(c["passed"] for c in cases.values()) and tests.get("passed", True)
    return {"cases": cases, "pytest_cuda": tests, "passed": passed}


# -- (b) and (d): the real Trainer ------------------------------------------------------------------


def _setup(
    ctx: Ctx, name: str, shape: dict[str, Any], overrides: dict[str, Any], batch: int, seq: int, dtype: Any
) -> tuple[Path, Path]:
    """A model directory (random weights, built on the device) and `batch` examples of `seq` tokens."""
    root = ctx.workdir / name
    model = root / "model"
    if not model.exists():
        config = model_config(shape, ctx.tokenizer, **overrides)
        write_model_dir(model, config, ctx.tokenizer, dtype=dtype, device=ctx.device.type)
        write_prompt_completion(
            root / "train.jsonl", ctx.tokenizer, examples=batch, seq_len=seq, prompt_tokens=min(32, seq // 4)
        )
        ctx.free()
    return model, root / "train.jsonl"


def _trainer(ctx: Ctx, model: Path, data: Path, out: Path, batch: int, seq: int, **fields: Any) -> Any:
    from worker.training.config import TrainingConfig
    from worker.training.trainer import Trainer

    config = TrainingConfig(
        model=str(model),
        loss="dft",
        train_file=data,
        output_dir=out,
        batch_size=batch,
        max_seq_length=seq,
        max_steps=10,
        warmup_ratio=0.0,
        device="cuda" if ctx.cuda else "cpu",
        **fields,
    )
    trainer = Trainer(config)
    trainer.setup()
    return trainer


def _isfinite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def trainer_step(ctx: Ctx) -> dict[str, Any]:
    """One DFT step of a SmolLM2-shaped model through the real Trainer, per precision."""
    batch, seq = (2, 32) if ctx.smoke else (4, 256)
    model, data = _setup(ctx, "smollm2", SMOLLM2_135M, TINY if ctx.smoke else {}, batch, seq, torch.float32)
    out: dict[str, Any] = {"batch": batch, "seq": seq}
    for precision in PRECISIONS:
        trainer = _trainer(
            ctx, model, data, ctx.workdir / f"smollm2-{precision}", batch, seq, precision=precision
        )
        ctx.sync()
        t0 = time.perf_counter()
        row = trainer.train_step(list(range(batch)))
        ctx.sync()
        out[precision] = {
            "loss": row["loss"],
            "nll": row["nll"],
            "grad_norm": row["grad_norm"],
            "finite": _isfinite(row["loss"]) and _isfinite(row["grad_norm"]) and not row["skipped"],
            "step_s": time.perf_counter() - t0,
        }
        trainer.close()
        del trainer
        ctx.free()
    out["passed"] = all(out[p]["finite"] for p in PRECISIONS)
    return out


def finetune_configs() -> dict[str, dict[str, Any]]:
    """Name -> TrainingConfig fields: the full fine-tune per precision and checkpointing, then LoRA
    (r=16, all-linear) in fp32 and bf16-mixed without checkpointing (last: the first skipped)."""
    from worker.training.config import LoraConfig

    configs: dict[str, dict[str, Any]] = {
        f"{precision}-{'ckpt' if ckpt else 'nockpt'}": dict(precision=precision, gradient_checkpointing=ckpt)
        for precision in PRECISIONS
        for ckpt in (False, True)
    }
    for precision in ("fp32", "bf16-mixed"):
        configs[f"lora-{precision}-nockpt"] = {"precision": precision, "lora": LoraConfig(r=16)}
    return configs


def full_finetune(ctx: Ctx, batch: int, seq: int) -> dict[str, Any]:
    """Peak memory and tokens/s of a Qwen2.5-1.5B-shaped fine-tune per configuration: setup (which
    runs the preflight pass), one untimed step, then `ctx.steps` timed steps."""
    shape = TINY_QWEN if ctx.smoke else {}
    model, data = _setup(ctx, "qwen", QWEN25_1_5B, shape, batch, seq, torch.bfloat16)
    out: dict[str, Any] = {"batch": batch, "seq": seq, "configs": {}}
    longest = 0.0
    for name, fields in finetune_configs().items():
        if time.monotonic() + longest > ctx.deadline:
            out["configs"][name] = {"skipped": "time budget"}
            continue
        t_config = time.monotonic()
        out["configs"][name] = _finetune_config(ctx, model, data, name, batch, seq, fields)
        longest = max(longest, time.monotonic() - t_config)
    runs = out["configs"]
    lora32, lora16 = runs["lora-fp32-nockpt"].get("peak_mib"), runs["lora-bf16-mixed-nockpt"].get("peak_mib")
    out["lora_bf16_vs_fp32_peak"] = lora16 / lora32 if lora16 and lora32 else None
    out["errors"] = [n for n, r in runs.items() if "error" in r]
    out["passed"] = not out["errors"] and all(r.get("finite", True) for r in runs.values())
    return out


def _finetune_config(
    ctx: Ctx, model: Path, data: Path, name: str, batch: int, seq: int, fields: dict[str, Any]
) -> dict[str, Any]:
    try:
        out = ctx.workdir / f"qwen-{name}"
        trainer = _trainer(ctx, model, data, out, batch, seq, micro_batch_size=batch, **fields)
        step = list(range(batch))
        trainer.train_step(step)  # untimed
        before = ctx.start_peak()
        times, rows = [], []
        for _ in range(ctx.steps):
            ctx.sync()
            t0 = time.perf_counter()
            rows.append(trainer.train_step(step))
            ctx.sync()
            times.append(time.perf_counter() - t0)
        processed = sum(len(e.input_ids) for e in trainer.train_data.examples)
        step_s = sum(times) / len(times)
        result = {
            "params": sum(p.numel() for p in trainer.objective.parameters()),
            "trainable_params": sum(p.numel() for p in trainer.params),
            "processed_tokens_per_step": processed,
            "trained_tokens_per_step": rows[-1]["step_tokens"],
            "step_s": step_s,
            "steps_s": times,
            "tokens_per_sec": processed / step_s,
            "peak_mib": ctx.peak_mib(),  # everything allocated during the steps, weights included
            "before_mib": before / MIB if ctx.cuda else None,  # weights + optimizer state
            "reserved_mib": torch.cuda.max_memory_reserved(ctx.device) / MIB if ctx.cuda else None,
            "micro_batch_size": trainer.memory.size,  # < batch: an out-of-memory halved it
            "loss": rows[-1]["loss"],
            "finite": all(_isfinite(r["loss"]) and not r["skipped"] for r in rows),
        }
        trainer.close()
        del trainer
        return result
    except Exception as err:  # one configuration's failure (e.g. out of memory) leaves the others
        return {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    finally:
        ctx.free()


# -- (c) the loss alone at two heads ---------------------------------------------------------------


def _naive_dft(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax((h @ w.t()).float(), -1)  # the full [n, V] logits, upcast as HF does
    lp = logp.gather(1, y[:, None]).squeeze(1)
    return -(lp.exp().detach() * lp).sum() / h.shape[0]


def _ours_dft(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from worker.training.loss import fused_linear_cross_entropy

    return fused_linear_cross_entropy(h, w, y, mode="dft")[0]


def _measure(
    ctx: Ctx, fn: Callable[..., torch.Tensor], n: int, d: int, vocab: int, repeats: int
) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16
    w = (torch.randn(vocab, d, generator=g) * 0.05).to(ctx.device, dtype).requires_grad_()
    h = torch.randn(n, d, generator=g).to(ctx.device, dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g).to(ctx.device)
    fn(h[:256], w, y[:256]).backward()  # warm-up: kernels, cuBLAS workspaces
    times, peaks, loss = [], [], 0.0
    for _ in range(repeats):
        h.grad = w.grad = None
        base = ctx.start_peak()
        ctx.sync()
        t0 = time.perf_counter()
        out = fn(h, w, y)
        out.backward()
        ctx.sync()
        times.append(time.perf_counter() - t0)
        peaks.append(ctx.peak_mib(base))
        loss = float(out.detach())
        del out
    return {"time_ms": min(times) * 1e3, "peak_mib": peaks[0], "loss": loss}


def loss_bench(ctx: Ctx) -> dict[str, Any]:
    """Forward + backward of ours vs the naive logits + cross-entropy, bf16 inputs, n tokens."""
    n, repeats = (64, 1) if ctx.smoke else (8192, 3)
    heads = {"smollm2": (576, 49152), "qwen2.5-1.5b": (1536, 151936)}
    if ctx.smoke:
        heads = {"smollm2": (64, 512), "qwen2.5-1.5b": (96, 1024)}
    out: dict[str, Any] = {"n": n, "dtype": "bfloat16", "repeats": repeats}
    for head, (d, vocab) in heads.items():
        row: dict[str, Any] = {"d": d, "vocab": vocab}
        for variant, fn in (("ours", _ours_dft), ("naive", _naive_dft)):
            try:
                row[variant] = _measure(ctx, fn, n, d, vocab, repeats)
            except Exception as err:  # the naive variant may not fit where ours does
                row[variant] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            ctx.free()
        ours, naive = row["ours"], row["naive"]
        if "time_ms" in ours and "time_ms" in naive:
            row["time_vs_naive"] = ours["time_ms"] / naive["time_ms"]
            row["loss_rel_diff"] = abs(ours["loss"] - naive["loss"]) / abs(naive["loss"])
            if ours["peak_mib"] is not None and naive["peak_mib"]:
                row["mem_vs_naive"] = ours["peak_mib"] / naive["peak_mib"]
        out[head] = row
    out["errors"] = [f"{h} {v}" for h in heads for v in ("ours", "naive") if "error" in out[h][v]]
    out["passed"] = not out["errors"]
    return out
