"""Peak memory of one optimizer step on the CPU: our trainer vs TRL's SFTTrainer, per memory model.

What it measures: a SmolLM2-135M-shaped model (bench/_synthetic.py: its config, random weights, a
small BPE tokenizer; `--layers` shrinks it), batch `--batch` prompt/completion sequences of exactly
`--seq` tokens (longer examples truncated; ~`--prompt-tokens` of each untrained), DFT, one
optimizer step, for each configuration:

- full fine-tune under fp32, bf16-mixed and bf16-pure; LoRA (r=16, alpha 32, dropout
  `--lora-dropout` 0.05, all-linear) under fp32 and bf16-mixed; each with gradient checkpointing
  off and on;
- ours: `worker.training.trainer.Trainer` (setup, which runs the preflight pass and allocates
  AdamW's state, then one `train_step` over the batch, measured);
- trl: `trl.SFTTrainer` with `SFTConfig(loss_type="dft", per_device_train_batch_size=batch,
  max_length=seq, use_cpu=True, bf16=<bf16-mixed>, gradient_checkpointing=<ckpt>,
  completion_only_loss=True, packing=False)`, `peft_config` = the same LoRA for LoRA rows, given a
  model object loaded as ours loads it (fp32 weights; a bf16 base for LoRA bf16-mixed). Its optimizer
  state is created by its first step, so its SECOND step is measured. TRL has no bf16-pure: those
  rows have no TRL figure.

Each run is a fresh subprocess. Memory is resident memory (RSS): `base` after the imports (torch,
transformers, peft, trl, datasets in both), `before` at the start of the measured step (model,
optimizer state, data; freed heap handed back first), `peak` the step's high-water mark (VmHWM after
`echo 5 > /proc/self/clear_refs`; where that is refused, a thread samples RSS every ms). Reported in
MiB: `step_peak` = peak - base (what the step needs), `before` = before - base, `activation` =
peak - before (activations, gradients and temporaries of the step), and `activation_minus_grads`
= activation - the trained parameters' bytes (their gradients, which no checkpointing removes; an
estimate: it assumes all gradients are alive at the peak). `params`, `trainable` and `optimizer`
are exact tensor bytes.

The allocator matters. By default (`--malloc mmap`) the subprocesses run with
MALLOC_MMAP_THRESHOLD_=65536, so glibc maps every block of 64 KiB or more on its own and unmaps
it when freed: RSS then follows the live tensors, like `max_memory_allocated` on a GPU. With
glibc's own heap (`--malloc glibc`) freed activations stay resident in the heap, by amounts that
depend on the order of allocations (up to several times the live memory in checkpointed steps),
so that figure says more about glibc than about the step. Both systems always run under the same
allocator.

FSDP: the fp32 full fine-tune under `torchrun --nproc-per-node 2` (gloo, `distributed: fsdp`, same
global batch), setup and one step; each rank's parameter + optimizer-state bytes are the exact sum of
its local shards' tensor bytes (not RSS), against the same sum in one process (K=1).

Goals (measured in the same run):
- LoRA bf16-mixed step_peak <= 0.55x LoRA fp32 step_peak (ours; checkpointing off and on)
- activation with checkpointing <= 0.35x without it (ours, every configuration)
- ours step_peak <= 0.8x TRL's in every configuration TRL has
- FSDP K=2 per-rank parameter + optimizer bytes <= 0.55x K=1
`ratios` adds, with no goal: checkpointing's ratio of activation_minus_grads, and ours/TRL of
activation alone.

Output: one JSON line on stdout (progress on stderr). Run from the repository root:

    .venv/bin/python -m bench.memory_model                    # everything, ~25 minutes on 2 cores
    .venv/bin/python -m bench.memory_model --layers 2 --seq 64 --vocab 4096   # smoke, ~3 minutes
    .venv/bin/python -m bench.memory_model --configs lora-fp32,lora-bf16-mixed --no-fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._synthetic import (
    SMOLLM2_135M,
    build_tokenizer,
    model_config,
    write_model_dir,
    write_prompt_completion,
)
from bench.loss_memory import PeakRSS, _malloc_trim, _status_kib

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
TUNES = {"full": ("fp32", "bf16-mixed", "bf16-pure"), "lora": ("fp32", "bf16-mixed")}
CONFIGS = [f"{tune}-{prec}" for tune, precs in TUNES.items() for prec in precs]
GOAL_LORA, GOAL_CKPT, GOAL_TRL, GOAL_FSDP = 0.55, 0.35, 0.8, 0.55
LORA_R, LORA_ALPHA = 16, 32  # target_modules: "all-linear"; dropout: --lora-dropout (0.05)
MMAP_THRESHOLD = "65536"  # --malloc mmap: glibc serves every block >= 64 KiB with its own mmap


def log(msg: str) -> None:
    print(f"[memory_model] {msg}", file=sys.stderr, flush=True)


def _rss() -> int:
    import gc

    gc.collect()
    _malloc_trim()
    return _status_kib("VmRSS") * 1024


def _imports() -> int:
    """The libraries both systems use, imported before the baseline is read."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    return _rss()


def _local_bytes(tensors: Any) -> int:
    """Bytes of these tensors as this process holds them (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def state_bytes(module: Any, optimizer: Any) -> dict[str, int]:
    """Exact bytes held: all parameters, the trained ones (= their gradients' bytes), AdamW's state."""
    import torch

    opt = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "params": _local_bytes(module.parameters()),
        "trainable": _local_bytes(p for p in module.parameters() if p.requires_grad),
        "optimizer": _local_bytes(opt),
    }


def _config(args: argparse.Namespace, out: Path, precision: str, lora: bool, ckpt: bool, **extra: Any) -> Any:
    from worker.training.config import LoraConfig, TrainingConfig

    return TrainingConfig(
        model=args.model_dir,
        loss="dft",
        train_file=Path(args.train_file),
        output_dir=out,
        batch_size=args.batch,
        max_seq_length=args.seq,
        max_steps=1,
        warmup_ratio=0.0,
        device="cpu",
        precision=precision,
        gradient_checkpointing=ckpt,
        lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=args.lora_dropout, target_modules="all-linear")
        if lora
        else None,
        seed=args.seed,
        **extra,
    )


def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    from worker.training.trainer import Trainer

    base = _imports()
    trainer = Trainer(_config(args, Path(args.out_dir), args.precision, args.tune == "lora", args.ckpt))
    trainer.setup()
    meter = PeakRSS()
    t0 = time.perf_counter()
    with meter:
        row = trainer.train_step(list(range(len(trainer.train_data.examples))))
    seconds = time.perf_counter() - t0
    held = state_bytes(trainer.objective, trainer.optimizer)
    return _figures(base, meter, seconds, loss=row["loss"], trained_tokens=row["step_tokens"], **held)


def _figures(base: int, meter: PeakRSS, seconds: float, **extra: Any) -> dict[str, Any]:
    grads = extra.get("trainable", 0)
    return {
        "step_peak_mib": (meter.base + meter.peak - base) / MIB,
        "before_mib": (meter.base - base) / MIB,
        "activation_mib": meter.peak / MIB,
        # the step's own gradients (as many bytes as the trained parameters) are part of the
        # activation figure and no checkpointing reduces them; this is the rest (an estimate)
        "activation_minus_grads_mib": (meter.peak - grads) / MIB,
        "base_rss_mib": base / MIB,
        "step_s": seconds,
        "memory_method": meter.method,
        **extra,
    }


def child_trl(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    base = _imports()
    lora = args.tune == "lora"
    bf16 = args.precision == "bf16-mixed"
    # as ours loads it: fp32 (master) weights, or a frozen bf16 base under fp32 adapters for LoRA bf16
    dtype = torch.bfloat16 if lora and bf16 else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [json.loads(line) for line in Path(args.train_file).read_text().splitlines() if line.strip()]
    peft_config = (
        LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=args.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        if lora
        else None
    )
    meter = PeakRSS()
    marks: dict[str, Any] = {}

    class MeasureSecondStep(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:  # the first step created the optimizer state
                meter.__enter__()
                marks["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                marks["seconds"] = time.perf_counter() - marks["t0"]
                meter.__exit__(None, None, None)
                trainer = marks["trainer"]
                marks["held"] = state_bytes(trainer.model, trainer.optimizer)

    config = SFTConfig(
        output_dir=args.out_dir,
        loss_type="dft",
        completion_only_loss=True,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_length=args.seq,
        packing=False,
        max_steps=2,
        learning_rate=5e-5,
        report_to="none",
        use_cpu=True,
        bf16=bf16,
        gradient_checkpointing=args.ckpt,
        save_strategy="no",
        logging_steps=1000,
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MeasureSecondStep()],
    )
    marks["trainer"] = trainer
    out = trainer.train()
    return _figures(base, meter, marks["seconds"], loss=out.training_loss, **marks["held"])


def child_fsdp(args: argparse.Namespace) -> dict[str, Any]:
    from worker.training.trainer import Trainer

    # every rank of the job shares one output directory (the parent's temporary one)
    trainer = Trainer(_config(args, Path(args.out_dir), "fp32", False, False, distributed="fsdp"))
    try:
        trainer.setup()
        row = trainer.train_step(list(range(len(trainer.train_data.examples))))
        held = state_bytes(trainer.objective, trainer.optimizer)
        world = trainer.world
    finally:
        trainer.close()
    return {
        "rank": world.rank,
        "world_size": world.world_size,
        "sharded": trainer.sharded,
        "loss": row["loss"],
        **held,
        "params_plus_optimizer_mib": (held["params"] + held["optimizer"]) / MIB,
        "rss_hwm_mib": _status_kib("VmHWM") / 1024,  # whole run, this rank (not reset)
    }


# -- parent -----------------------------------------------------------------------------------------


def _child_cmd(args: argparse.Namespace, child: str, result: Path, **kw: Any) -> list[str]:
    cmd = ["-m", "bench.memory_model", "--child", child, "--result-file", str(result)]
    cmd += ["--model-dir", args.model_dir, "--train-file", args.train_file]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--seed", str(args.seed)]
    cmd += ["--lora-dropout", str(args.lora_dropout)]
    for key, value in kw.items():
        if value is True:
            cmd.append(f"--{key}")
        elif value not in (None, False):
            cmd += [f"--{key}", str(value)]
    return cmd


def run_child(args: argparse.Namespace, label: str, child: str, nproc: int = 1, **kw: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="memory_model_") as tmp:
        result = Path(tmp) / "result.json"
        kw["out-dir"] = str(Path(tmp) / "run")
        launcher = [sys.executable]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if args.malloc == "mmap":
            env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
            env["OMP_NUM_THREADS"] = "1"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                launcher + _child_cmd(args, child, result, **kw),
                cwd=REPO,
                env=env,
                stdout=sys.stderr,
                check=False,
                timeout=args.timeout,
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        files = sorted(Path(tmp).glob("result.json*"))
        if rc != 0 or not files:
            log(f"{label}: failed ({rc})")
            return {"error": f"subprocess exit {rc}"}
        ranks = [json.loads(f.read_text()) for f in files]
        out = ranks[0] if nproc == 1 else {"ranks": ranks}
        log(f"{label}: {time.perf_counter() - t0:.0f} s: {json.dumps(out)}")
        return out


def _ratio(a: Any, b: Any) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _goal(bound: float, values: dict[str, float | None]) -> dict[str, Any]:
    known = [v for v in values.values() if v is not None]
    met = None if not known else all(v <= bound for v in known) and len(known) == len(values)
    return {"target": f"<= {bound}", "values": values, "met": met}


def evaluate(
    results: dict[str, dict[str, Any]], fsdp: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(goals, further ratios that explain them, with no goal)."""

    def get(system: str, name: str, key: str) -> Any:
        return results.get(system, {}).get(name, {}).get(key)

    lora, ckpt, trl = {}, {}, {}
    info: dict[str, dict[str, float | None]] = {
        "checkpointing_activation_minus_grads_vs_none": {},
        "ours_vs_trl_activation": {},
    }
    for suffix in ("nockpt", "ckpt"):
        lora[suffix] = _ratio(
            get("ours", f"lora-bf16-mixed-{suffix}", "step_peak_mib"),
            get("ours", f"lora-fp32-{suffix}", "step_peak_mib"),
        )
    for name in results.get("ours", {}):
        if name.endswith("-nockpt"):
            stem = name.removesuffix("-nockpt")
            ckpt[stem] = _ratio(
                get("ours", f"{stem}-ckpt", "activation_mib"), get("ours", name, "activation_mib")
            )
            info["checkpointing_activation_minus_grads_vs_none"][stem] = _ratio(
                get("ours", f"{stem}-ckpt", "activation_minus_grads_mib"),
                get("ours", name, "activation_minus_grads_mib"),
            )
    for name in results.get("trl", {}):
        trl[name] = _ratio(get("ours", name, "step_peak_mib"), get("trl", name, "step_peak_mib"))
        info["ours_vs_trl_activation"][name] = _ratio(
            get("ours", name, "activation_mib"), get("trl", name, "activation_mib")
        )
    goals = {
        "lora_bf16_vs_fp32_peak": _goal(GOAL_LORA, lora),
        "checkpointing_activation_vs_none": _goal(GOAL_CKPT, ckpt),
        "ours_vs_trl_peak": _goal(GOAL_TRL, trl),
    }
    if fsdp:
        k1 = fsdp.get("k1", {}).get("params_plus_optimizer_mib")
        per_rank = [r.get("params_plus_optimizer_mib") for r in fsdp.get("k2", {}).get("ranks", [])]
        k2 = max(per_rank) if per_rank and None not in per_rank else None
        goals["fsdp_k2_vs_k1_params_optimizer"] = _goal(GOAL_FSDP, {"k2_per_rank_max": _ratio(k2, k1)})
    return goals, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Prints one JSON line.")
    p.add_argument(
        "--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"], help="decoder layers (30)"
    )
    p.add_argument("--vocab", type=int, default=SMOLLM2_135M["vocab_size"], help="vocabulary (49152)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="untrained prompt tokens (default 64)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--checkpointing", default="off,on", help="off,on (default both)")
    p.add_argument("--systems", default="ours,trl", help="ours,trl (default both)")
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="skip the FSDP K=2 vs K=1 runs")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument(
        "--malloc",
        choices=("mmap", "glibc"),
        default="mmap",
        help="mmap (default): blocks >= 64 KiB are mapped and unmapped one by one, so RSS follows the live "
        "tensors; glibc: its default heap, which keeps freed blocks resident (RSS above the live tensors)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess (default 1800)")
    # child mode
    p.add_argument("--child", choices=("ours", "trl", "fsdp"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--tune", choices=tuple(TUNES), help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.layers, args.seq, args.batch, args.vocab) < 1 or args.seq < 16:
        p.error("--layers, --batch, --vocab must be >= 1 and --seq >= 16")
    if unknown := set(args.configs.split(",")) - set(CONFIGS):
        p.error(f"--configs: unknown {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        result = {"ours": child_ours, "trl": child_trl, "fsdp": child_fsdp}[args.child](args)
        rank = os.environ.get("RANK")
        Path(args.result_file + (f".{rank}" if rank and args.child == "fsdp" else "")).write_text(
            json.dumps(result)
        )
        return 0

    systems = [s for s in ("ours", "trl") if s in args.systems.split(",")]
    ckpts = [c == "on" for c in ("off", "on") if c in args.checkpointing.split(",")]
    results: dict[str, dict[str, Any]] = {s: {} for s in systems}
    fsdp: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="memory_model_") as tmp:
        tokenizer = build_tokenizer()
        config = model_config(SMOLLM2_135M, tokenizer, num_hidden_layers=args.layers, vocab_size=args.vocab)
        args.model_dir = str(write_model_dir(Path(tmp) / "model", config, tokenizer, seed=args.seed))
        args.train_file = str(
            write_prompt_completion(
                Path(tmp) / "train.jsonl",
                tokenizer,
                examples=args.batch,
                seq_len=args.seq,
                prompt_tokens=min(args.prompt_tokens, args.seq // 2),
                seed=args.seed,
            )
        )
        log(f"layers={args.layers} vocab={args.vocab} batch={args.batch}x{args.seq}; configs {args.configs}")
        for name in [c for c in CONFIGS if c in args.configs.split(",")]:
            tune, precision = name.split("-", 1)
            for ckpt in ckpts:
                label = f"{name}-{'ckpt' if ckpt else 'nockpt'}"
                for system in systems:
                    if system == "trl" and precision == "bf16-pure":
                        continue  # TRL has no pure-bf16 memory model
                    log(f"{system} {label} ...")
                    kw: dict[str, Any] = {"tune": tune, "precision": precision, "ckpt": ckpt}
                    results[system][label] = run_child(args, f"{system} {label}", system, **kw)
        if args.fsdp:
            for k in (1, 2):
                log(f"fsdp K={k} ...")
                fsdp[f"k{k}"] = run_child(args, f"fsdp K={k}", "fsdp", nproc=k)
    goals, ratios = evaluate(results, fsdp)
    failed = [f"{s} {n}" for s, rs in results.items() for n, r in rs.items() if "error" in r]
    failed += [f"fsdp {k}" for k, r in fsdp.items() if "error" in r]
    out = {
        "bench": "memory_model",
        "model": {"shape": "SmolLM2-135M", "layers": args.layers, "vocab": args.vocab, "weights": "random"},
        "batch": args.batch,
        "seq": args.seq,
        "loss": "dft",
        "device": "cpu",
        "malloc": args.malloc,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": args.lora_dropout, "targets": "all-linear"},
        "threads": os.cpu_count(),
        "results": results,
        "fsdp": fsdp,
        "goals": goals,
        "ratios": ratios,
        "all_goals_met": all(g["met"] is True for g in goals.values()),
        "errors": failed,
    }
    print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
