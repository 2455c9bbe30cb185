#!/usr/bin/env bash
# Reproduce benchmarks/RESULTS.md: every micro set and the end-to-end runs separately,
# each started once the machine's 1-minute load average is under 0.9 (the benchmark
# machine is shared), with 2 threads (torch's default here) and with 1 thread.
# Output: benchmarks/results/*.json; render with `python benchmarks/render.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
waitq() { for _ in $(seq 1 120); do
  l=$(cut -d' ' -f1 /proc/loadavg); awk "BEGIN{exit !($l < 0.9)}" && return; sleep 5; done; }
bench() { python -m torch_regularizers bench --native "$@"; }
for s in large transformer tiny; do
  waitq; bench --no-e2e --sets "$s" --reps 40 --json > "$out/micro-$s-default-threads.json"
done
for s in large transformer tiny; do
  waitq; bench --no-e2e --sets "$s" --reps 40 --threads 1 --json > "$out/micro-$s-1-thread.json"
done
waitq; bench --no-micro --rounds 30 --json > "$out/e2e-native.json"
waitq; bench --no-micro --rounds 30 --backend aten --json > "$out/e2e-aten.json"
waitq; python benchmarks/passes.py --threads 1 --json > "$out/passes-1-thread.json"
