#!/usr/bin/env bash
# Set up and run the test suite. As root, tests marked `slurm` install and start a real local Slurm
# cluster (Debian packages) when MUCS_SLURM_INSTALL=1; otherwise they are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash install_requirements.sh
exec .venv/bin/python -m pytest "$@"
