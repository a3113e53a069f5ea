#!/usr/bin/env bash
# Every method through the real Flower simulation runtime (e3sfc-run = flwr run --stream on a
# private SuperLink, 10 simulated SuperNodes), default config (digits, MLP, 40 rounds, seed 0),
# then one table and one plot. Usage: bash bench/flower_digits.sh [extra key=value ...]
# (METHODS="qsgd e3sfc" bash bench/flower_digits.sh re-runs only those; the table covers every
# run folder present)
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/flower-digits
mkdir -p "$out"
# Each method as its paper runs it: STC compresses both ways with error feedback on the
# server too (Sattler et al. 2019); Top-k, signSGD and QSGD are uplink compressors (dense
# downlink), and so is PowerSGD here (its all-reduce has no server; see the README); E-3SFC
# compresses both ways; 3sfc is its uplink-only ablation.
for method in ${METHODS:-fedavg topk stc signsgd qsgd powersgd 3sfc e3sfc}; do
  extra=()
  if [ "$method" = stc ]; then extra=('downlink="compressed"'); fi
  e3sfc-run "method=\"$method\"" "run-name=\"$method\"" "output-dir=\"$out\"" "${extra[@]}" "$@" > "$out/$method.log" 2>&1
  tail -n 3 "$out/$method.log"
done
e3sfc-compare "$out"/*/ --out bench/results/flower_digits.png | tee bench/results/flower_digits.md
