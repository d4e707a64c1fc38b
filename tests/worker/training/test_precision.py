"""The memory model: weights load in the dtype they train in, checkpoints keep the base's dtype,
bf16-pure and QLoRA train; every combination the trainer cannot run is refused by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.training.conftest import build_model_dir
from worker.training.config import ConfigError, LoraConfig, parse_config
from worker.training.trainer import Trainer

MakeConfig = Callable[..., Any]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama stored in bfloat16, as most published checkpoints are."""
    from transformers import AutoModelForCausalLM

    path = build_model_dir(tmp_path_factory.mktemp("bf16-src"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    target = tmp_path_factory.mktemp("bf16-model")
    model.save_pretrained(target)
    for f in path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (target / f.name).write_bytes(f.read_bytes())
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    return target


def trained(config: Any) -> Trainer:
    trainer = Trainer(config)
    trainer.setup()
    trainer.train()
    return trainer


def test_a_bf16_base_gives_a_bf16_checkpoint_and_resumes_exactly(
    make_config: MakeConfig, bf16_model: Path
) -> None:
    from transformers import AutoModelForCausalLM

    config = make_config(model=str(bf16_model), precision="bf16-mixed", max_steps=2)
    trainer = trained(config)
    assert trainer.lm.dtype == torch.float32  # fp32 master weights
    ckpt = trainer.config.output_dir / "checkpoints" / "step-000002"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    assert (ckpt / "exact_weights.safetensors").is_file()  # the fp32 masters, for resuming
    base_bytes = (bf16_model / "model.safetensors").stat().st_size
    assert (ckpt / "model.safetensors").stat().st_size <= base_bytes * 1.05  # not twice the bytes
    ours = trainer.lm.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, ours[name].to(torch.bfloat16)), name

    # Resumed from that checkpoint, the master weights are the fp32 ones, not their bf16 rounding.
    resumed = Trainer(make_config(model=str(bf16_model), precision="bf16-mixed", max_steps=2))
    resumed.setup()
    assert resumed.step == 2
    for name, value in resumed.lm.state_dict().items():
        assert torch.equal(value, ours[name]), name


def test_lora_keeps_its_base_in_bf16_and_adapters_in_fp32(make_config: MakeConfig) -> None:
    config = make_config(
        precision="bf16-mixed", max_steps=3, learning_rate=1e-2, lora=LoraConfig(r=4, dropout=0.0)
    )
    trainer = trained(config)
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    adapters = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    rows = trainer.log.metrics.read()
    assert all(r["nll"] == r["nll"] for r in rows) and rows[-1]["skipped"] is False


def test_bf16_pure_trains(make_config: MakeConfig) -> None:
    config = make_config(precision="bf16-pure", max_steps=24, learning_rate=1e-2, lr_scheduler="constant")
    trainer = trained(config)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    state = next(iter(trainer.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16  # optimizer state in bf16 too
    rows = trainer.log.metrics.read()
    first, last = rows[0]["nll"], sum(r["nll"] for r in rows[-4:]) / 4
    assert last < first - 0.3, (first, last)


def test_qlora_trains_its_adapters_over_a_4bit_base(make_config: MakeConfig, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.worker.training.conftest import build_tokenizer

    tokenizer = build_tokenizer()  # 4-bit blocks are 64 wide: a model 64 wide
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    tokenizer.save_pretrained(tmp_path / "wide")
    lora = LoraConfig(
        r=4, dropout=0.0, quantize="nf4", target_modules=["q_proj", "v_proj", "up_proj"], merge=True
    )
    trainer = Trainer(make_config(model=str(tmp_path / "wide"), max_steps=2, learning_rate=1e-2, lora=lora))
    trainer.setup()
    quantized = [m for m in trainer.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "the base was not quantized"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    # The merged model is the full-precision base plus the adapter, not a 4-bit rounding of it.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(
        trainer.config.output_dir / "checkpoints" / "step-000002" / "merged"
    )
    assert merged.dtype == torch.float32 and not getattr(merged, "is_quantized", False)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "wide")
    q = "model.layers.0.self_attn.q_proj.weight"
    delta = merged.state_dict()[q] - base.state_dict()[q]
    assert 0 < float(delta.abs().max()) < 0.1  # the adapter's update, on the exact base weights


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"precision": "bf16-pure", "lora": {"r": 4}}, "precision"),
        ({"distributed": "fsdp", "lora": {"r": 4}}, "distributed"),
        ({"micro_batch_size": 2, "gradient_accumulation_steps": 2}, "micro_batch_size"),
        ({"micro_batch_size": 16}, "micro_batch_size"),
        ({"precision": "fp16"}, "precision"),
        ({"lora": {"quantize": "int3"}}, "lora.quantize"),
        ({"attn_implementation": "magic"}, "attn_implementation"),
    ],
)
def test_impossible_combinations_name_the_field(tmp_path: Path, fields: dict[str, Any], field: str) -> None:
    base = {
        "model": "m",
        "train_file": str(tmp_path / "t.jsonl"),
        "output_dir": str(tmp_path),
        "batch_size": 8,
    }
    with pytest.raises(ConfigError) as err:
        parse_config({**base, **fields})
    assert str(err.value).startswith(field), str(err.value)


def test_the_old_precision_names_still_mean_what_they_meant(tmp_path: Path) -> None:
    base = {"model": "m", "train_file": str(tmp_path / "t.jsonl"), "output_dir": str(tmp_path)}
    assert parse_config({**base, "precision": "float32"}).precision == "fp32"
    assert parse_config({**base, "precision": "bfloat16"}).precision == "bf16-mixed"
