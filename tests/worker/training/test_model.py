"""Model sources: HF directory, local hub cache only, GGUF; one clear error otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.worker.training.conftest import smollm2_gguf
from worker.training.model import ModelLoadError, load_model


def test_missing_paths_and_uncached_hub_ids_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model: GGUF file .* does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="without downloading"):
        load_model("tunepool-tests/not-in-the-cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model:"):
        load_model(str(tmp_path / "empty"))


# Python a model directory may name through `auto_map`: it would leave a marker file if ever imported.
CUSTOM_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("the model's own code was executed")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""
MODEL_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
TOKENIZER_MAP = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}


def plant_custom_code(
    directory: Path, marker: Path, config: dict[str, Any], tokenizer: dict[str, Any]
) -> None:
    """Write evil.py into `directory` and merge `config` / `tokenizer` into its JSON configs."""
    (directory / "evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    for name, extra in (("config.json", config), ("tokenizer_config.json", tokenizer)):
        if extra:
            path = directory / name
            current = json.loads(path.read_text()) if path.is_file() else {}
            path.write_text(json.dumps({**current, **extra}))


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir()
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


@pytest.mark.parametrize(
    ("config", "tokenizer"),
    [
        ({"auto_map": MODEL_MAP}, {}),  # a known model_type: transformers' own class, the map ignored
        ({"auto_map": MODEL_MAP, "model_type": "evil"}, {}),  # only the custom code could load it
        ({"auto_map": MODEL_MAP, "architectures": ["EvilModel"]}, {}),
        ({}, {"auto_map": TOKENIZER_MAP}),
        ({}, {"auto_map": TOKENIZER_MAP, "tokenizer_class": "EvilTokenizer"}),
    ],
)
def test_a_models_own_code_is_never_run(
    tmp_path: Path, tiny_model: Path, config: dict[str, Any], tokenizer: dict[str, Any]
) -> None:
    """A directory whose configs point at its own Python (auto_map) either loads with transformers'
    classes or is refused with one clear message; the code never runs."""
    marker = tmp_path / "MARKER"
    custom = copy_model(tiny_model, tmp_path / "custom")
    plant_custom_code(custom, marker, config, tokenizer)
    try:
        model, tok = load_model(str(custom))
        assert type(model).__name__ == "LlamaForCausalLM" and "Evil" not in type(tok).__name__
    except ModelLoadError as err:
        assert "never runs a model's code" in str(err)
    assert not marker.exists()


def test_a_lora_checkpoints_own_code_is_never_run(tmp_path: Path, tiny_model: Path) -> None:
    """A LoRA checkpoint (an adapter directory, and its base) as a model and as a resume source."""
    from worker.training.config import LoraConfig, TrainingConfig
    from worker.training.model import apply_lora, prepare_model

    marker = tmp_path / "MARKER"
    base = copy_model(tiny_model, tmp_path / "base")
    plant_custom_code(base, marker, {"auto_map": MODEL_MAP}, {"auto_map": TOKENIZER_MAP})
    model, tokenizer = load_model(str(base))
    adapter = tmp_path / "adapter"
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), str(base)).save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    plant_custom_code(adapter, marker, {}, {"auto_map": TOKENIZER_MAP})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["auto_mapping"] = {"base_model_class": "EvilModel", "parent_library": "evil"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    merged, _ = load_model(str(adapter))  # the base through load_model, the adapter merged into it
    assert type(merged).__name__ == "LlamaForCausalLM"
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = TrainingConfig(model=str(base), train_file=train, output_dir=tmp_path / "run", lora=LoraConfig(r=2))
    import torch

    from worker.training.model import resolve_precision

    cpu = torch.device("cpu")
    resumed, _ = prepare_model(cfg, adapter, resolve_precision("fp32", cpu), cpu)
    assert type(resumed).__name__ == "PeftModelForCausalLM"
    assert not marker.exists()


@pytest.mark.slow
def test_a_gguf_files_neighbours_code_is_never_run(tmp_path: Path) -> None:
    """Configs beside a .gguf file are read by transformers too: custom code there is refused."""
    marker = tmp_path / "MARKER"
    os.symlink(smollm2_gguf(), tmp_path / "model.gguf")
    config = {"auto_map": MODEL_MAP, "model_type": "evil"}
    plant_custom_code(
        tmp_path, marker, config, {"auto_map": TOKENIZER_MAP, "tokenizer_class": "EvilTokenizer"}
    )
    with pytest.raises(ModelLoadError, match="never runs a model's code"):
        load_model(str(tmp_path / "model.gguf"))
    assert not marker.exists()


def test_a_head_attribute_the_architecture_ignores_is_not_applied(tmp_path: Path, tiny_model: Path) -> None:
    """Llama has no soft-cap: a stray final_logit_softcapping in its config must not change the loss.
    The head is what the self-check finds the model's own logits to be (test_heads.py)."""
    from tests.worker.training.conftest import chat_rows, write_jsonl
    from worker.training.config import TrainingConfig
    from worker.training.model import HeadSpec
    from worker.training.trainer import Trainer

    scaled = copy_model(tiny_model, tmp_path / "scaled")
    config = json.loads((scaled / "config.json").read_text())
    config["final_logit_softcapping"] = 0.5  # would change the loss a lot, were it applied
    (scaled / "config.json").write_text(json.dumps(config))
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    trainer = Trainer(
        TrainingConfig(model=str(scaled), train_file=train, output_dir=tmp_path / "run", device="cpu")
    )
    trainer.setup()
    assert trainer.objective.head == HeadSpec()


@pytest.mark.slow
def test_smollm2_gguf_loads_dequantised_and_saves_as_plain_model(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(str(smollm2_gguf()))
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert not hasattr(model.config, "quantization_config") and not model.is_quantized
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
