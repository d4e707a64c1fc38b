# The two commands of the README. Both do their own set-up (scripts/setup.sh).
.PHONY: demo test lint setup

setup:
	@scripts/setup.sh

# Fine-tune the real SmolLM2-135M-Instruct with DFT on the bundled dataset and generate from it.
demo: setup
	.venv/bin/python scripts/demo.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

# The whole test suite, with ruff and mypy first. CI runs exactly this (.ci/run).
test: lint
	@scripts/setup.sh --browser
	.venv/bin/python -m pytest
