#!/usr/bin/env bash
# One prepared device check, under 5 minutes on one GPU (see benchmarks/gpu_check.py):
# logits parity with the CPU golden runs, sampler images/s at XL sizes (eager tf32, eager
# bf16, compiled bf16; CFG and SoftCFG), Inception images/s, memory-bandwidth roofline, and one
# end-to-end run at AliTok-XL size (sample.images=none + evaluation while sampling): images/s, stage shares.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--compile-cfg]     # GPU
#   bash benchmarks/gpu_check.sh --device cpu --tiny              # CPU, no compiling (CI)
#
# Writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
