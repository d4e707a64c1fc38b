"""Every mainstream head, checked: soft-capped and scaled logits are part of the fused loss, the
start-up self-check refuses a head it cannot reproduce, LoRA on the output projection trains,
MoE router losses are added, and evaluation builds no gradient buffers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.training.conftest import build_tokenizer
from worker.training.config import LoraConfig
from worker.training.data import collate
from worker.training.model import HeadSpec, ModelLoadError, head_candidates
from worker.training.objective import Objective, naive_stats, self_check
from worker.training.trainer import Trainer

MakeConfig = Callable[..., Any]


def save_tiny(path: Path, config: Any, model_class: Any, *, scale_embeddings: float = 1.0) -> Path:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # larger logits, so that a soft-cap or a scale changes the loss markedly
        model.get_output_embeddings().weight.mul_(scale_embeddings)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = build_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=3.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    return save_tiny(tmp_path_factory.mktemp("gemma2"), config, Gemma2ForCausalLM, scale_embeddings=40.0)


@pytest.mark.parametrize("loss", ["dft", "sft"])
def test_soft_capped_head_equals_the_models_own_logits(
    make_config: MakeConfig, gemma2: Path, loss: str
) -> None:
    trainer = Trainer(make_config(model=str(gemma2), loss=loss, max_steps=1))
    trainer.setup()
    assert trainer.objective.head == HeadSpec(1.0, 3.0)
    batch = collate(trainer.train_data.examples[:4], trainer.pad_id)
    trainer.objective.eval()
    with torch.no_grad():
        reference = naive_stats(
            trainer.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch
        )
        ours = trainer.objective(batch, 1.0).stats
        trainer.objective.head = HeadSpec()  # without the soft-cap: visibly wrong, so the check can fail
        plain = trainer.objective(batch, 1.0).stats
    n = reference.tokens
    expected = reference.loss_sum if loss == "dft" else reference.nll_sum
    assert ours.loss_sum / n == pytest.approx(expected / n, rel=1e-5)
    assert ours.nll_sum / n == pytest.approx(reference.nll_sum / n, rel=1e-5)
    assert ours.prob_sum / n == pytest.approx(reference.prob_sum / n, rel=1e-5)
    assert ours.correct == reference.correct
    assert abs(plain.nll_sum - reference.nll_sum) / reference.nll_sum > 0.05


def test_the_head_candidates_read_every_known_attribute() -> None:
    from transformers import CohereConfig, GraniteConfig, RecurrentGemmaConfig

    assert HeadSpec(1.0, 30.0) == head_candidates(RecurrentGemmaConfig(logits_soft_cap=30.0))[0]
    assert HeadSpec(0.0625) in head_candidates(CohereConfig(logit_scale=0.0625))
    granite = head_candidates(GraniteConfig(logits_scaling=8.0))
    assert HeadSpec(1 / 8.0) in granite and HeadSpec(8.0) in granite  # Granite divides; others multiply


def test_a_head_the_fused_loss_cannot_reproduce_is_refused_by_name(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    class OddHead(LlamaForCausalLM):  # stands for any architecture doing something else to its logits
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.7 + 0.3
            return out

    model = OddHead.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    tok = build_tokenizer()
    ids = tok("<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n3<|im_end|>")["input_ids"]
    from worker.training.data import TokenizedExample

    batch = collate([TokenizedExample(ids, [False] * 10 + [True] * (len(ids) - 10), 1)], tok.pad_token_id)
    objective = Objective(model, mode="dft", chunk_size=64, autocast=None)
    with pytest.raises(ModelLoadError, match=r"model: 'acme/odd-head'.*cannot reproduce"):
        self_check(objective, batch, head_candidates(model.config), "acme/odd-head")
    plain = Objective(
        AutoModelForCausalLM.from_pretrained(tiny_model), mode="dft", chunk_size=64, autocast=None
    )
    assert self_check(plain, batch, [HeadSpec()], "tiny") == HeadSpec()


def test_lora_on_the_output_projection_trains_its_adapter(make_config: MakeConfig) -> None:
    lora = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "lm_head"])
    trainer = Trainer(make_config(max_steps=3, learning_rate=1e-2, lora=lora))
    trainer.setup()
    head = trainer.lm.get_output_embeddings()
    assert hasattr(head, "lora_B")
    before = head.lora_B["default"].weight.detach().clone()
    before_a = head.lora_A["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, head.lora_B["default"].weight)
    assert not torch.equal(before_a, head.lora_A["default"].weight)


def test_evaluation_allocates_no_weight_gradient(make_config: MakeConfig, tmp_path: Path) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.worker.training.conftest import chat_rows, write_jsonl

    valid = write_jsonl(tmp_path / "valid.jsonl", chat_rows(6, seed=4))
    trainer = Trainer(make_config(max_steps=1, validation_file=valid))
    trainer.setup()
    vocab, d = trainer.lm.get_output_embeddings().weight.shape
    shapes: list[tuple[int, ...]] = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    with Shapes():
        trainer.evaluate()
    assert (vocab, d) not in shapes
    with Shapes():  # a training pass does build it: the probe could fail
        trainer.forward_loss(collate(trainer.train_data.examples[:2], trainer.pad_id), 1.0)[0].backward()
    assert (vocab, d) in shapes


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = build_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        output_router_logits=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )  # fmt: skip
    return save_tiny(tmp_path_factory.mktemp("mixtral"), config, MixtralForCausalLM)


def test_moe_router_loss_is_added_as_the_model_defines_it(make_config: MakeConfig, mixtral: Path) -> None:
    trainer = Trainer(make_config(model=str(mixtral), loss="sft", max_steps=1, batch_size=4))
    trainer.setup()
    assert trainer.objective.aux_coef == pytest.approx(0.02)
    batch = collate(trainer.train_data.examples[:4], trainer.pad_id)
    trainer.objective.eval()
    with torch.no_grad():
        theirs = trainer.lm(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True
        ).aux_loss
        ours = trainer.objective(batch, float(batch.n_trained), aux_weight=1.0)
    assert ours.aux_loss == pytest.approx(float(theirs), rel=1e-5)
    sft_only = ours.stats.loss_sum / batch.n_trained
    assert float(ours.loss) == pytest.approx(sft_only + 0.02 * float(theirs), rel=1e-5)
    trainer.objective.train()
    row = trainer.train_step(list(range(4)))
    assert row["aux_loss"] > 0
