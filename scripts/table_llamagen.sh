#!/usr/bin/env bash
# LlamaGen: CFG at the upstream setting (configs/llamagen_<size>.yaml: constant scale 2.0 for
# B/L, 1.75 XL/XXL, 1.65 3B; no top-k/top-p; T 1) vs SoftCFG (strength 1, Step Normalization),
# plus a small grid over the SoftCFG strength and the scale (GRID=0 skips it).
#   scripts/table_llamagen.sh xl               # or b (the 256 checkpoint), l, xxl, 3b (384)
#   LABELS=random scripts/table_llamagen.sh l  # upstream's random classes, like for like
#   SMOKE=1 scripts/table_llamagen.sh b        # CPU end-to-end check with the tiny golden GPT
# Rows: RESULTS/table_llamagen/rows/*.json; table (with the published FIDs): results.md (+ .csv).
source "$(dirname "$0")/common.sh"
size="${1:-}"
[[ "$size" =~ ^(b|l|xl|xxl|3b)$ ]] || usage_error "usage: scripts/table_llamagen.sh {b,l,xl,xxl,3b} (got '${size}')"
model="llamagen_$size"
[[ "$size" == b ]] && model=llamagen_b_256  # the checkpoint whose published FID (5.46) is the reference
table=table_llamagen
if [[ "${SMOKE:-0}" == 1 ]]; then GRID="${GRID:-0}"; else GRID="${GRID:-1}"; fi

setting $table $model CFG --softcfg-strength 0
setting $table $model SoftCFG --softcfg-strength 1 --step-norm true
if [[ "$GRID" == 1 ]]; then
  scale="$("$PYTHON" -c 'import sys; from omegaconf import OmegaConf
print(OmegaConf.load(sys.argv[1]).model.generator.guidance_scale)' "$REPO/configs/$model.yaml")"
  for strength in 0.5 2; do
    setting $table $model "SoftCFG α=$strength" --softcfg-strength $strength --step-norm true
  done
  for s in $(awk -v g="$scale" 'BEGIN { print g - 0.25, g + 0.25 }'); do
    setting $table $model CFG --guidance-scale "$s" --softcfg-strength 0
    setting $table $model SoftCFG --guidance-scale "$s" --softcfg-strength 1 --step-norm true
  done
fi
collect $table
