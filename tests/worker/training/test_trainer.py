"""The training loop: accumulation invariance, learning, metrics, skipped steps, cancel, checkpoints."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.training.conftest import write_jsonl
from worker.training.checkpoint import MARKER_FILE, list_checkpoints, load_trainer_state
from worker.training.data import micro_batches
from worker.training.trainer import Trainer, TrainingError

MakeConfig = Callable[..., Any]


def setup_trainer(config: Any, **hooks: Any) -> Trainer:
    trainer = Trainer(config, **hooks)
    trainer.setup()
    return trainer


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_gives_the_same_parameters(make_config: MakeConfig, tmp_path: Path) -> None:
    """One step over 8 sequences == 4 micro-batches of 2 (fp32, 1e-6), with padding in both."""
    results = []
    for accumulation in (1, 4):
        config = make_config(
            gradient_accumulation_steps=accumulation, max_steps=1, output_dir=tmp_path / f"gas{accumulation}"
        )
        trainer = setup_trainer(config)
        before = params(trainer.model)
        row = trainer.train_step(first_step(trainer))
        results.append((params(trainer.model), row, before))
    (p1, row1, before), (p4, row4, _) = results
    assert row1["padding_fraction"] > 0 and row4["padding_fraction"] < row1["padding_fraction"]
    assert row1["step_tokens"] == row4["step_tokens"]
    moved = max(float((p1[k] - before[k]).abs().max()) for k in p1)
    assert moved > 1e-4  # the step did change the weights
    for k in p1:
        assert float((p1[k] - p4[k]).abs().max()) <= 1e-6, k
    for key in ("loss", "nll", "mean_token_prob", "token_accuracy", "grad_norm"):
        assert row1[key] == pytest.approx(row4[key], rel=1e-5), key


def first_step(trainer: Trainer) -> list[int]:
    from worker.training.data import plan_epoch

    lengths = [len(e.input_ids) for e in trainer.train_data.examples]
    plan = plan_epoch(
        lengths, trainer.config.batch_size, seed=trainer.config.seed, epoch=0, group_by_length=False
    )
    return plan[0]


def test_dft_lowers_nll_and_reports_mean_p_times_nll(make_config: MakeConfig) -> None:
    trainer = setup_trainer(make_config(max_steps=30, learning_rate=1e-2, lr_scheduler="constant"))
    # Before the first step: the objective of that step, computed independently on full logits
    step = first_step(trainer)
    expected = {"loss": 0.0, "nll": 0.0, "p": 0.0, "n": 0}
    with torch.no_grad():
        for batch in micro_batches(trainer.train_data.examples, step, len(step), trainer.pad_id):
            logits = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
                :, :-1
            ]
            mask = batch.trained[:, 1:]
            log_p = (
                torch.log_softmax(logits.double(), -1)
                .gather(2, batch.input_ids[:, 1:, None])
                .squeeze(2)[mask]
            )
            expected["loss"] += float((-log_p.exp() * log_p).sum())
            expected["nll"] += float(-log_p.sum())
            expected["p"] += float(log_p.exp().sum())
            expected["n"] += int(mask.sum())
    row = trainer.train_step(step)
    assert row["step_tokens"] == expected["n"]
    assert row["loss"] == pytest.approx(expected["loss"] / expected["n"], rel=1e-5)
    assert row["nll"] == pytest.approx(expected["nll"] / expected["n"], rel=1e-5)
    assert row["mean_token_prob"] == pytest.approx(expected["p"] / expected["n"], rel=1e-5)
    assert row["loss"] < row["nll"] / 10  # DFT values are far smaller than the NLL

    rows: list[dict[str, Any]] = []
    trainer.on_metrics = rows.append
    trainer.train()
    first, last = rows[0]["nll"], sum(r["nll"] for r in rows[-4:]) / 4
    assert last < first - 0.5, (first, last)
    assert rows[-1]["token_accuracy"] > rows[0]["token_accuracy"]


def test_metrics_rows_eval_and_summary(make_config: MakeConfig, tmp_path: Path) -> None:
    from tests.worker.training.conftest import chat_rows

    valid = write_jsonl(tmp_path / "valid.jsonl", chat_rows(10, seed=9))
    trainer = setup_trainer(make_config(validation_file=valid, eval_every=2, max_steps=5))
    result = trainer.train()
    rows = trainer.log.metrics.read()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    required = {
        "step",
        "epoch",
        "loss",
        "nll",
        "mean_token_prob",
        "token_accuracy",
        "lr",
        "grad_norm",
        "trained_tokens",
        "tokens_per_sec",
        "elapsed_s",
    }
    assert all(required <= set(r) for r in rows)
    evaluated = [r["step"] for r in rows if "valid_loss" in r]
    assert evaluated == [2, 4, 5]  # every eval_every steps and at the end
    assert all(
        0 <= r["valid_token_accuracy"] <= 1 and r["valid_nll"] > r["valid_loss"]
        for r in rows
        if "valid_loss" in r
    )
    assert rows[-1]["trained_tokens"] == sum(r["step_tokens"] for r in rows)
    summary = result.summary
    assert summary["status"] == "completed" and summary["steps"] == 5
    assert summary["final"]["valid_nll"] == rows[-1]["valid_nll"]
    assert result.checkpoint is not None and result.checkpoint.name == "step-000005"


def test_non_finite_gradient_skips_the_step_and_says_so(make_config: MakeConfig) -> None:
    events: list[dict[str, Any]] = []
    trainer = setup_trainer(make_config(max_steps=3), on_event=events.append)
    weight = trainer.lm.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    handle = weight.register_hook(lambda g: g * float("nan"))
    before = params(trainer.model)
    row = trainer.train_step(first_step(trainer))
    handle.remove()
    assert row["skipped"] is True and row["grad_norm"] != row["grad_norm"]  # NaN
    after = params(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # optimizer did not step
    assert any("not finite" in e["message"] for e in events)
    row = trainer.train_step(first_step(trainer))
    assert row["skipped"] is False
    assert all(torch.isfinite(v).all() for v in params(trainer.model).values())
    assert trainer.counters["skipped_steps"] == 1


def test_cancel_between_steps_keeps_last_checkpoint(make_config: MakeConfig) -> None:
    steps_seen: list[int] = []
    trainer = setup_trainer(
        make_config(max_steps=10, checkpoint_every=2),
        on_metrics=lambda r: steps_seen.append(r["step"]),
        should_stop=lambda: len(steps_seen) >= 3,
    )
    result = trainer.train()
    assert result.status == "cancelled" and result.step == 3 == len(steps_seen)
    assert result.checkpoint is not None and result.checkpoint.name == "step-000002"
    assert result.summary["status"] == "cancelled"


def test_keep_last_n_and_checkpoint_contents(make_config: MakeConfig) -> None:
    trainer = setup_trainer(make_config(max_steps=4, checkpoint_every=1, keep_last_n=2))
    trainer.train()
    found = list_checkpoints(trainer.config.output_dir)
    assert [step for step, _ in found] == [3, 4]
    path = found[-1][1]
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", MARKER_FILE} <= {
        p.name for p in path.iterdir()
    }
    state = load_trainer_state(path)  # weights_only=True
    assert state["step"] == 4 and "scheduler" in state
    # the optimizer state is keyed by parameter name, so a run resumes on any number of processes
    assert "model.model.embed_tokens.weight" in state["optimizer"]["state"]


def test_full_checkpoint_loads_with_plain_transformers_and_generates(make_config: MakeConfig) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = setup_trainer(make_config(max_steps=2))
    result = trainer.train()
    assert result.checkpoint is not None
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    ours = trainer.lm.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())
    prompt: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_lora_checkpoint_loads_with_peft_and_merged(make_config: MakeConfig, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker.training.config import LoraConfig
    from worker.training.model import load_model

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, merge=True)
    trainer = setup_trainer(make_config(max_steps=3, lora=lora, learning_rate=1e-2))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in trainer.model.parameters()) / 5
    result = trainer.train()
    ckpt = result.checkpoint
    assert (
        ckpt is not None
        and (ckpt / "adapter_config.json").is_file()
        and (ckpt / "merged" / "config.json").is_file()
    )

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        untouched = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, ckpt)(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(ckpt / "merged")(input_ids=ids).logits
        as_base, _ = load_model(str(ckpt))  # a LoRA checkpoint as the base model of a new job
        rebased = as_base(input_ids=ids).logits
    assert float((expected - untouched).abs().max()) > 1e-4  # the adapter changed the model
    for other in (adapted, merged, rebased):
        assert torch.allclose(other, expected, atol=1e-5)
    generated = AutoModelForCausalLM.from_pretrained(ckpt / "merged").generate(
        ids, max_new_tokens=3, do_sample=False
    )
    assert generated.shape[1] == 8


def test_bfloat16_autocast_step_runs_on_cpu(make_config: MakeConfig) -> None:
    trainer = setup_trainer(make_config(max_steps=1, precision="bfloat16"))
    row = trainer.train_step(first_step(trainer))
    assert row["skipped"] is False and row["nll"] == row["nll"] and row["loss"] > 0


def test_resume_refuses_a_different_run(make_config: MakeConfig) -> None:
    config = make_config(max_steps=2)
    setup_trainer(config).train()
    rows = config.train_file.read_text().splitlines()
    config.train_file.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(TrainingError, match="train_file"):
        setup_trainer(config)
    with pytest.raises(TrainingError, match="learning_rate"):
        setup_trainer(copy.copy(make_config(max_steps=2, learning_rate=5e-4, train_file=config.train_file)))


def test_every_example_too_long_is_a_clear_error(make_config: MakeConfig) -> None:
    with pytest.raises(TrainingError, match=r"train_file: all 48 examples are longer than max_seq_length=8"):
        setup_trainer(make_config(max_seq_length=8, overlength="drop"))
