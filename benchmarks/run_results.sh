#!/usr/bin/env bash
# Reproduce benchmarks/RESULTS.md and the README's Performance tables on this machine:
#
#     benchmarks/run_results.sh            # ~15 min on the 2-core development machine (plus waits for a quiet machine)
#
# Every micro set and the end-to-end runs separately, each started once the machine's
# 1-minute load average is under $MAX_LOAD (default 0.9; the machine is shared, and after
# 10 minutes of waiting a run starts anyway: the load is recorded in each JSON file), at
# torch's default thread count and with 1 thread, native kernels built (--native) and the
# stock-ATen path timed in the same rounds (the Regularizer[aten] and library[aten]
# columns). Output: benchmarks/results/*.json, the rendered tables
# benchmarks/results/{tables,targets}-*.md, and the README blocks between
# <!-- perf:... --> markers (rewritten by benchmarks/render.py --readme).
#
# GPU (not run here: no GPU on the development machine):
#     python -m torch_regularizers bench --device cuda --json > benchmarks/results/cuda.json
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
MAX_LOAD=${MAX_LOAD:-0.9}
waitq() { for _ in $(seq 1 120); do
  l=$(cut -d' ' -f1 /proc/loadavg); awk "BEGIN{exit !($l < $MAX_LOAD)}" && return; sleep 5; done; }
bench() { python -m torch_regularizers bench --native "$@"; }
for s in large transformer tiny; do
  waitq; bench --no-e2e --sets "$s" --reps 40 --json > "$out/micro-$s-default-threads.json"
done
for s in large transformer tiny; do
  waitq; bench --no-e2e --sets "$s" --reps 40 --threads 1 --json > "$out/micro-$s-1-thread.json"
done
waitq; bench --no-micro --rounds 30 --json > "$out/e2e-native.json"
waitq; bench --no-micro --rounds 30 --backend aten --json > "$out/e2e-aten.json"
waitq; python benchmarks/passes.py --json > "$out/passes-default-threads.json"
waitq; python benchmarks/passes.py --threads 1 --json > "$out/passes-1-thread.json"

render() { python benchmarks/render.py "$@"; }
render "$out"/micro-{large,transformer,tiny}-default-threads.json > "$out/tables-default-threads.md"
render "$out"/micro-{large,transformer,tiny}-1-thread.json > "$out/tables-1-thread.md"
render "$out"/e2e-native.json "$out"/e2e-aten.json > "$out/tables-e2e.md"
render --targets "$out"/micro-{large,transformer,tiny}-default-threads.json > "$out/targets-default-threads.md"
render --targets "$out"/micro-{large,transformer,tiny}-1-thread.json > "$out/targets-1-thread.md"
render --readme README.md "$out"/micro-*-default-threads.json "$out"/micro-*-1-thread.json "$out"/e2e-native.json
