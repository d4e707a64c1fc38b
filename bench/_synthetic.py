"""Models and data built from nothing, for the benchmarks that must not depend on a download or on the
bundled GGUF file: real architectures (SmolLM2-135M, Qwen2.5-1.5B) from their configs with random
weights, a small byte-level BPE tokenizer with a ChatML template, and prompt/completion JSONL whose
examples are longer than the wanted sequence length (so truncation makes every one exactly that long).

Random weights change no figure these benchmarks report (memory, time, FLOPs): those depend on the
shapes alone. The tokenizer's few hundred ids all lie inside the models' vocabularies."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = [
    *("the", "cat", "sat", "on", "a", "mat", "and", "the", "answer", "is", "42", "so", "we", "add"),
    *("17", "to", "25", "then", "check", "each", "step", "carefully", "before", "we", "write", "down"),
    *("what", "remains", "of", "the", "total", "number", "of", "apples"),
]

# SmolLM2-135M(-Instruct)'s architecture (its config.json; the same as the bundled GGUF's).
SMOLLM2_135M: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
}
# Qwen2.5-1.5B(-Instruct)'s architecture (q/k/v projections carry a bias).
QWEN25_1_5B: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}


def build_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer (ChatML, EOS <|im_end|>, pad <|endoftext|>), trained in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf


def model_config(shape: dict[str, Any], tokenizer: Any, **overrides: Any) -> Any:
    """A transformers config of `shape` (overrides: e.g. num_hidden_layers, vocab_size)."""
    from transformers import AutoConfig

    fields = {**shape, **overrides}
    model_type = fields.pop("model_type")
    rope_theta = fields.pop("rope_theta")
    config = AutoConfig.for_model(
        model_type,
        **fields,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        use_cache=False,
    )
    # transformers 5 keeps rope settings in rope_parameters; older versions read rope_theta
    if isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters["rope_theta"] = rope_theta
    else:
        config.rope_theta = rope_theta
    return config


def write_model_dir(
    path: Path, config: Any, tokenizer: Any, *, dtype: Any = None, device: str = "cpu", seed: int = 0
) -> Path:
    """Build the model of `config` with random weights (on `device`, in `dtype`) and save it with the
    tokenizer as a Hugging Face directory the trainer loads like any other."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return path


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_prompt_completion(
    path: Path, tokenizer: Any, *, examples: int, seq_len: int, prompt_tokens: int, seed: int = 0
) -> Path:
    """`examples` prompt/completion lines: a prompt of about `prompt_tokens` tokens and a completion
    that makes each example longer than `seq_len` tokens (checked), so `max_seq_length = seq_len` with
    `overlength: truncate` gives every example exactly `seq_len` tokens."""
    rng = random.Random(seed)
    lines = []
    for _ in range(examples):
        prompt = _words(rng, max(1, prompt_tokens // 2))
        while len(tokenizer(prompt)["input_ids"]) < prompt_tokens:
            prompt += " " + _words(rng, 4)
        completion = _words(rng, seq_len)
        while len(tokenizer(prompt + " " + completion)["input_ids"]) <= seq_len + 1:
            completion += " " + _words(rng, seq_len // 2 + 1)
        lines.append(json.dumps({"prompt": prompt, "completion": " " + completion}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
