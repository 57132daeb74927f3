#!/usr/bin/env bash
# The embedded default end to end: set up, then run all five stages for random removal and each method
# on the digits job, then eval. Usage: bash scripts/demo.sh [methods (default: pixel)] [-- overrides]
# Finished stages are skipped, so `bash scripts/demo.sh pixel,mucs` after the default adds only MUCS's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash install_requirements.sh
PY=.venv/bin/python
methods=(pixel)
[ $# -gt 0 ] && [ "$1" != "--" ] && { IFS=, read -ra methods <<< "$1"; shift; }
[ "${1:-}" = "--" ] && shift
job=${JOB:-digits_dit_edm}
seed=${SEED:-1}
start=$(date +%s)
for m in random "${methods[@]}"; do
  $PY pipeline.py --what=tpre,gpre,a,tpost,gpost --job="$job" --seed="$seed" --attrib="$m" "$@"
done
run=$($PY -c "from mucs.config import compose, run_name; import sys; print(run_name(compose(sys.argv[1:])))" "job=$job" "seed=$seed" "$@")
$PY eval.py --jobs="$run" --methods="random,$(IFS=,; echo "${methods[*]}")" --pval --show_controls "$@"
echo "[demo] finished in $(( $(date +%s) - start )) s (after setup)"
