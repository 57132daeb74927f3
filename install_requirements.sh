#!/usr/bin/env bash
# Idempotent setup: a .venv in the project root with pinned torch and everything else.
# Usage: bash install_requirements.sh   (re-running is cheap: it only installs what is missing)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH=${TORCH_VERSION:-2.14.1}
TORCHVISION=${TORCHVISION_VERSION:-0.29.1}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mucs-installed
want="$(cat requirements.txt pyproject.toml install_requirements.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
echo "[setup] installing into .venv (torch==$TORCH torchvision==$TORCHVISION and requirements.txt)"
# uv installs the ~4 GB of torch wheels about 4x faster than pip (parallel, no byte-compiling); pip if uv is unavailable
use_uv=0
.venv/bin/python -m pip install -q uv 2>/dev/null && use_uv=1
install() {
  if [ "$use_uv" = 1 ]; then
    .venv/bin/python -m uv pip install -q --python .venv/bin/python "$@" && return
    echo "[setup] uv could not install $*; using pip from here on"
    use_uv=0
  fi
  .venv/bin/python -m pip install -q "$@"
}
install -r requirements.txt "torch==$TORCH" "torchvision==$TORCHVISION"  # one resolution, torch pinned
install --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
