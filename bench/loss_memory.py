"""Peak memory and time of the DFT loss, forward + backward, on the output projection alone.

What it measures: the DFT objective (design.md, "The method: DFT") on `n` trained tokens with
hidden states `h [n, d]`, output projection `W [V, d]` and targets `y [n]`, fp32 on the CPU,
forward + backward (the gradients of `h` and `W` are produced, and counted). Default shape:
n=8192 trained tokens, SmolLM2's d=576 and V=49152. Variants:

- ours:  `worker.training.loss.fused_linear_cross_entropy(h, W, y, mode="dft", normalizer=n)`,
         the fused chunked linear-cross-entropy, then `loss.backward()`.
- naive: the full-logits formula of the paper's code, LLaMA-Factory and ms-swift:
         `logp = log_softmax(h @ W.T)`, `lp = logp[y]`, `loss = -(sg(exp(lp)) * lp).sum() / n`.
- trl:   TRL's `ChunkedLogProbFunction` called exactly as `add_fused_lm_head` calls it for
         `SFTTrainer` (chunk `_CHUNKED_LOGPROB_CHUNK_SIZE`, outputs log_probs/entropy/is_top1), then
         SFTTrainer's DFT branch `loss = (-lp * sg(exp(lp))).sum() / n`. On a CPU it takes its torch
         (non-Triton) path.
- floor: the three `[n, d] x [d, V]`-sized matrix products the gradient needs, `z = h W^T`,
         `grad_h = G W`, `grad_W = G^T h` (G = z, computed before timing), each timed alone as
         the best over `--repeats` and over two equivalent forms (into a preallocated, touched
         buffer with `out=`, or allocating its result), and summed: a time floor only, its
         memory is not compared.

Each variant runs in its own subprocess (`--variant NAME`), so its peak memory is clean. Memory
is the peak resident set size ABOVE the inputs: the inputs are built (fully written), a small
warm-up runs on separate small tensors, freed heap is handed back (`malloc_trim`), the kernel's
high-water mark is reset (writing 5 to /proc/self/clear_refs; where that is refused, a thread
samples /proc/self/statm every millisecond), and peak VmHWM minus the RSS at that point is
reported, in MiB. Time is wall-clock of forward + backward, the best of `--repeats` (memory is
that of the first measured repeat). All variants use the same seeded inputs; targets get a
spread of probabilities from ~0 to ~1 (h has a random multiple of W[y] added), as in training.

Correctness (a separate, untimed subprocess at `--check-n` tokens): loss and gradients of ours
and of TRL against naive fp32 and against a float64 reference; each difference is reported as
max|a - b| / max|b|. Ours must match naive to 1e-5.

Goals (all ratios measured in the same run):
- memory: ours <= 0.10x naive and <= 0.10x trl
- time:   ours <= 0.6x naive, <= 0.5x trl, <= 1.3x floor

Output: one JSON line on stdout (progress on stderr). Run from the repository root:

    .venv/bin/python -m bench.loss_memory                  # full size, ~3-5 minutes on 2 cores
    .venv/bin/python -m bench.loss_memory --repeats 3      # best of 3 (timings on a shared machine)
    .venv/bin/python -m bench.loss_memory --n 512 --vocab 4096   # smoke test, ~30 s

The timings are wall-clock on the CPU: run it when nothing else is, and compare figures of one
run only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("ours", "naive", "trl", "floor")
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks add_fused_lm_head for
GOALS = {  # name: (ratio key, upper bound)
    "mem_vs_naive": ("mem_vs_naive", 0.10),
    "mem_vs_trl": ("mem_vs_trl", 0.10),
    "time_vs_naive": ("time_vs_naive", 0.6),
    "time_vs_trl": ("time_vs_trl", 0.5),
    "time_vs_floor": ("time_vs_floor", 1.3),
}
CHECK_TOLERANCE = 1e-5
MIB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[loss_memory] {msg}", file=sys.stderr, flush=True)


# -- memory measurement --------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_bytes_statm() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    """Give freed heap back to the OS, so the baseline RSS holds only live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 64


class PeakRSS:
    """Peak resident memory above the RSS at entry, in bytes (`.peak` after the block)."""

    def __init__(self) -> None:
        self.method = "clear_refs+VmHWM" if _can_reset_hwm() else "statm sampling (1 ms)"
        self.peak = 0
        self._stop = threading.Event()
        self._max = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes_statm())
            time.sleep(0.001)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        if self.method.startswith("clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS") * 1024
        else:
            self.base = _rss_bytes_statm()
            self._max = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            top = max(self._max, _rss_bytes_statm())
        else:
            top = _status_kib("VmHWM") * 1024
        self.peak = max(0, top - self.base)


# -- inputs and variants ---------------------------------------------------------------------------


def make_inputs(n: int, d: int, vocab: int, seed: int) -> tuple[Any, Any, Any]:
    """Seeded (hidden [n,d], weight [V,d], targets [n]), fp32, hidden and weight requiring grad.

    Logits have a std of ~2.4 and the target's logit is raised by a random 0..3 multiple of
    |W[y]|^2 (~5.8), so target probabilities range from ~0 to ~1 rather than all being ~1/V.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=g) * 0.1
    targets = torch.randint(0, vocab, (n,), generator=g)
    beta = torch.rand(n, 1, generator=g) * 3.0
    hidden = torch.randn(n, d, generator=g) + beta * weight[targets]
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets


def default_chunk_size() -> int:
    from worker.training.loss import fused_linear_cross_entropy

    return int(inspect.signature(fused_linear_cross_entropy).parameters["chunk_size"].default)


def trl_chunk_size() -> int:
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    return int(_CHUNKED_LOGPROB_CHUNK_SIZE)


def run_ours(hidden, weight, targets, chunk_size: int | None):
    from worker.training.loss import fused_linear_cross_entropy

    loss, _stats = fused_linear_cross_entropy(
        hidden,
        weight,
        targets,
        mode="dft",
        normalizer=float(hidden.shape[0]),
        chunk_size=default_chunk_size() if chunk_size is None else chunk_size,
    )
    loss.backward()
    return loss.detach()


def run_naive(hidden, weight, targets):
    import torch

    n = hidden.shape[0]
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), -1)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    loss = -(lp.exp().detach() * lp).sum() / n
    loss.backward()
    return loss.detach()


def run_trl(hidden, weight, targets):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    n = hidden.shape[0]
    # Same positional arguments as trl.trainer.utils.add_fused_lm_head: hidden, weight, bias, targets,
    # temperature, chunk_size, final_logit_softcapping, logit_scale, outputs.
    out = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, TRL_OUTPUTS
    )
    lp = out[0]
    loss = (-lp * lp.exp().detach()).sum() / n  # SFTTrainer.compute_loss, loss_type == "dft"
    loss.backward()
    return loss.detach()


def variant_fn(name: str, chunk_size: int | None) -> Callable[[Any, Any, Any], Any]:
    if name == "ours":
        return lambda h, w, y: run_ours(h, w, y, chunk_size)
    if name == "naive":
        return run_naive
    if name == "trl":
        return run_trl
    raise ValueError(name)


# -- child processes -------------------------------------------------------------------------------


def child_measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    name = args.variant
    n, d, vocab = args.n, args.d, args.vocab
    hidden, weight, targets = make_inputs(n, d, vocab, args.seed)
    result: dict[str, Any] = {"variant": name, "threads": torch.get_num_threads()}

    if name == "floor":
        result.update(child_floor(hidden.detach(), weight.detach(), args.repeats))
        return result

    fn = variant_fn(name, args.chunk_size)
    # Warm-up on separate small tensors (libraries' one-time setup), freed before the baseline.
    wh, ww, wy = make_inputs(min(n, 256), d, vocab, args.seed + 1)
    fn(wh, ww, wy)
    del wh, ww, wy

    times, peaks, losses = [], [], []
    method = ""
    for _ in range(args.repeats):
        hidden.grad = None
        weight.grad = None
        meter = PeakRSS()
        method = meter.method
        with meter:
            t0 = time.perf_counter()
            loss = fn(hidden, weight, targets)
            dt = time.perf_counter() - t0
        assert hidden.grad is not None and weight.grad is not None, "backward produced no gradient"
        times.append(dt)
        peaks.append(meter.peak / MIB)
        losses.append(float(loss))
    result.update(
        time_s=min(times),
        times_s=times,
        peak_mib=peaks[0],
        peaks_mib=peaks,
        loss=losses[0],
        memory_method=method,
        inputs_mib=(hidden.numel() + weight.numel()) * 4 / MIB + targets.numel() * 8 / MIB,
    )
    if name == "ours":
        result["chunk_size"] = args.chunk_size or default_chunk_size()
    if name == "trl":
        result["chunk_size"] = trl_chunk_size()
    return result


def child_floor(h, w, repeats: int) -> dict[str, Any]:
    """Best time of each of the three products, over `repeats` and over two equivalent forms of each
    (into a preallocated, already-touched buffer with `out=`, or allocating its result), summed."""
    import torch

    n, vocab, d = h.shape[0], w.shape[0], w.shape[1]
    z = torch.zeros(n, vocab)  # the logits, and G (the logits gradient) of the two backward products
    gh = torch.zeros(n, d)
    gw = torch.zeros(vocab, d)
    products: dict[str, list[Callable[[], Any]]] = {
        "z = h @ W^T": [lambda: torch.mm(h, w.t(), out=z), lambda: h @ w.t()],
        "grad_h = G @ W": [lambda: torch.mm(z, w, out=gh), lambda: z @ w],
        "grad_W = G^T @ h": [lambda: torch.mm(z.t(), h, out=gw), lambda: z.t() @ h],
    }
    best: dict[str, float] = {}
    with torch.no_grad():
        torch.mm(h, w.t(), out=z)  # G = z; also a warm-up
        for label, forms in products.items():
            times = []
            for form in forms:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    out = form()
                    times.append(time.perf_counter() - t0)
                    del out
            best[label] = min(times)
    return {"time_s": sum(best.values()), "products_s": best, "peak_mib": None}


def _rel(a, b) -> float:
    """max|a - b| / max|b|, in float64."""
    a, b = a.double(), b.double()
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def child_check(args: argparse.Namespace) -> dict[str, Any]:
    """Loss and gradients of ours / trl vs naive fp32 and a float64 reference, at --check-n tokens."""
    import torch

    n = min(args.check_n, args.n)
    hidden, weight, targets = make_inputs(n, args.d, args.vocab, args.seed)

    def grads(fn, dtype):
        h = hidden.detach().to(dtype).requires_grad_(True)
        w = weight.detach().to(dtype).requires_grad_(True)
        loss = fn(h, w, targets)
        assert h.grad is not None and w.grad is not None
        return loss.detach(), h.grad, w.grad

    ref64 = grads(run_naive, torch.float64)
    naive = grads(run_naive, torch.float32)
    ours = grads(variant_fn("ours", args.chunk_size), torch.float32)
    trl = grads(run_trl, torch.float32)

    def compare(a, b) -> dict[str, float]:
        return {"loss": _rel(a[0], b[0]), "grad_hidden": _rel(a[1], b[1]), "grad_weight": _rel(a[2], b[2])}

    ours_vs_naive = compare(ours, naive)
    return {
        "n": n,
        "tolerance": CHECK_TOLERANCE,
        "ours_vs_naive": ours_vs_naive,
        "ours_vs_fp64": compare(ours, ref64),
        "naive_vs_fp64": compare(naive, ref64),
        "trl_vs_fp64": compare(trl, ref64),
        "met": all(v <= CHECK_TOLERANCE for v in ours_vs_naive.values()),
    }


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loss_memory_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.loss_memory",
            "--variant",
            name,
            "--result-file",
            str(out),
            "--n",
            str(args.n),
            "--d",
            str(args.d),
            "--vocab",
            str(args.vocab),
            "--repeats",
            str(args.repeats),
            "--seed",
            str(args.seed),
            "--check-n",
            str(args.check_n),
        ]
        if args.chunk_size is not None:
            cmd += ["--chunk-size", str(args.chunk_size)]
        t0 = time.perf_counter()
        # The child's stdout goes to our stderr: our stdout carries only the final JSON line.
        proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            log(f"{name}: subprocess failed with exit code {proc.returncode}")
            return {"error": f"subprocess exit code {proc.returncode}"}
        result: dict[str, Any] = json.loads(out.read_text())
        log(f"{name}: done in {wall:.1f} s: {json.dumps(result)}")
        return result


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Peak memory and time of the DFT loss forward+backward: ours vs the full-logits "
        "formula vs TRL's chunked log-prob kernel vs a matmul floor. Prints one JSON line.",
    )
    p.add_argument("--n", type=int, default=8192, help="trained tokens (default 8192)")
    p.add_argument("--d", type=int, default=576, help="hidden size (default 576, SmolLM2-135M)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default 49152, SmolLM2)")
    p.add_argument("--repeats", type=int, default=1, help="measured runs per variant; time is the best")
    p.add_argument(
        "--chunk-size", type=int, default=None, help="chunk size of ours (default: the function's default)"
    )
    p.add_argument("--check-n", type=int, default=2048, help="tokens of the correctness check (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    p.add_argument("--variant", choices=(*VARIANTS, "check"), help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    for field in ("n", "d", "vocab", "repeats", "check_n"):
        if getattr(args, field) < 1:
            p.error(f"--{field.replace('_', '-')} must be >= 1")
    if args.chunk_size is not None and args.chunk_size < 1:
        p.error("--chunk-size must be >= 1")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant is not None:  # child
        result = child_check(args) if args.variant == "check" else child_measure(args)
        Path(args.result_file).write_text(json.dumps(result))
        return 0

    wanted = [v for v in VARIANTS if v in args.variants.split(",")]
    log(f"n={args.n} d={args.d} V={args.vocab} repeats={args.repeats}; variants {wanted}")
    results: dict[str, dict[str, Any]] = {}
    for name in wanted:
        log(f"running {name} ...")
        results[name] = run_child(name, args)
    check: dict[str, Any] | None = None
    if not args.skip_check:
        log(f"correctness check at n={min(args.check_n, args.n)} ...")
        check = run_child("check", args)

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
        return None if x is None or y is None or y <= 0 else x / y

    ratios = {
        "mem_vs_naive": ratio("ours", "naive", "peak_mib"),
        "mem_vs_trl": ratio("ours", "trl", "peak_mib"),
        "time_vs_naive": ratio("ours", "naive", "time_s"),
        "time_vs_trl": ratio("ours", "trl", "time_s"),
        "time_vs_floor": ratio("ours", "floor", "time_s"),
    }
    goals: dict[str, dict[str, Any]] = {}
    for name, (key, bound) in GOALS.items():
        value = ratios[key]
        goals[name] = {
            "target": f"<= {bound}",
            "value": value,
            "met": None if value is None else value <= bound,
        }
    losses = {k: v["loss"] for k, v in results.items() if "loss" in v}
    ref = losses.get("naive")
    failed = [k for k, v in {**results, "check": check or {}}.items() if "error" in v]
    out = {
        "bench": "loss_memory",
        "shape": {"n": args.n, "d": args.d, "vocab": args.vocab, "dtype": "float32", "device": "cpu"},
        "repeats": args.repeats,
        "seed": args.seed,
        "variants": results,
        "ratios": ratios,
        "loss_rel_diff_vs_naive": (
            {k: abs(v - ref) / abs(ref) for k, v in losses.items() if k != "naive"} if ref else None
        ),
        "correctness": check,
        "goals": goals,
        "all_goals_met": all(g["met"] is True for g in goals.values())
        and (check is None or check.get("met") is True),
        "errors": failed,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
    }
    print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
