#!/usr/bin/env bash
# Install PyTorch into the venv whose pip is $1, without a multi-GB download when it can be avoided:
#   1. torch already importable -> nothing to do;
#   2. a local wheel (pip's find-links, e.g. a wheelhouse on this machine) -> use it, no network;
#   3. no NVIDIA GPU -> the CPU build from PyTorch's CPU index (~200 MB instead of several GB);
#   4. otherwise the default build from PyPI (CUDA).
set -euo pipefail
PIP="$1"
PY="$(dirname "$PIP")/python"
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"; exit 0
fi
if "$PIP" install -q --no-index --no-deps torch 2>/dev/null; then
  # The wheel came from a local wheelhouse; now let pip fetch its small pure-Python dependencies.
  version="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
  "$PIP" install -q "torch==$version"
  echo "torch $version installed from a local wheel"; exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  if "$PIP" install -q torch --index-url https://download.pytorch.org/whl/cpu; then
    echo "torch (CPU build) installed"; exit 0
  fi
fi
"$PIP" install -q torch
