"""Model sources: HF directory, local hub cache only, GGUF; one clear error otherwise."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_custom_code_is_never_trusted(tmp_path: Path, tiny_model: Path) -> None:
    """A directory that asks for remote code (auto_map to a custom class) is refused, not executed."""
    custom = tmp_path / "custom"
    custom.mkdir()
    for f in tiny_model.iterdir():
        (custom / f.name).write_bytes(f.read_bytes())
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "evil"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "evil.py").write_text("raise SystemExit('custom code was executed')\n")
    with pytest.raises(ModelLoadError, match="model:"):
        load_model(str(custom))


def test_logit_scaling_heads_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    for f in tiny_model.iterdir():
        (scaled / f.name).write_bytes(f.read_bytes())
    config = json.loads((scaled / "config.json").read_text())
    config["final_logit_softcapping"] = 30.0
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="final_logit_softcapping"):
        load_model(str(scaled))


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
