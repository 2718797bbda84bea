#!/usr/bin/env bash
# RAR: CFG (the upstream README settings in configs/rar_<size>.yaml) vs SoftCFG.
#   scripts/table_rar.sh l                      # or b, xl, xxl;  NPROC=8 SEEDS="0 1 2" ...
#   SMOKE=1 scripts/table_rar.sh l              # CPU end-to-end check with the tiny golden RAR
# Rows: RESULTS/table_rar/rows/*.json; table: RESULTS/table_rar/results.md (+ .csv).
source "$(dirname "$0")/common.sh"
size="${1:-}"
[[ "$size" =~ ^(b|l|xl|xxl)$ ]] || usage_error "usage: scripts/table_rar.sh {b,l,xl,xxl} (got '${size}')"
model="rar_$size"
table=table_rar

setting $table $model CFG --softcfg-strength 0
if [[ "$size" == l ]]; then
  # The paper's known RAR-L setting (SPEC section 1); temperature stays the config's 1.02.
  setting $table $model SoftCFG --guidance-scale 6.5 --guidance-scale-pow 1.01 --softcfg-strength 1 --step-norm true
else
  setting $table $model SoftCFG --softcfg-strength 1 --step-norm true
fi
collect $table CFG  # the CFG baseline of every paired delta
