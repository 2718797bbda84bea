#!/usr/bin/env bash
# Multi-node ImageNet sampling under SLURM: one torchrun per node, a c10d rendezvous on
# the first node. Every process takes its own batches (batch k -> rank k mod world), so
# tokens equal a single-process run for the same seed, and a rerun resumes.
#
#   sbatch --nodes=4 scripts/slurm_sample.sh alitok/sample_imagenet.py \
#       --config configs/alitok_xl.yaml --experiment.output_dir=outputs/alitok_xl_softcfg \
#       --experiment.generator_checkpoint=weights/alitok_xl.bin \
#       --experiment.tokenizer_checkpoint=weights/AliTok.pth \
#       --model.generator.softcfg_strength=1
#
# GPUS_PER_NODE (default 8) and MASTER_PORT (default 29500) can be set in the environment.
#SBATCH --job-name=softcfg-sample
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "error: give the sampler script and its options, e.g. alitok/sample_imagenet.py --config ..." >&2
    exit 2
fi
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"

# srun starts one task per node; each task runs torchrun for the node's GPUs.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    "$@"
