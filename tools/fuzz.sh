#!/usr/bin/env bash
# The long fuzz run of the checkpoint and Hugging Face safetensors readers (issue 10, item 6):
# mutated checkpoints of the six engine configs (85%) and the HF fixtures (15%); it exits
# non-zero on any panic or on a damaged input that loads. The CI test (rust/tests/fuzz.rs)
# runs the same loop on ~24,500 inputs; this runs COUNT (default 10^6).
#
#   tools/fuzz.sh [COUNT] [THREADS]
#
# THREADS defaults to the machine's processors. Measured: 20,000 inputs in 5.6 s on 2 threads, so
# 10^6 take about 5 minutes.
set -euo pipefail
count="${1:-1000000}"
threads="${2:-$(nproc)}"
case "$count$threads" in
  *[!0-9]*) echo "usage: tools/fuzz.sh [COUNT] [THREADS] (whole numbers)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../rust"
exec cargo run --release --example fuzz -- "$count" "$threads"
