#!/usr/bin/env bash
# Table 1, AliTok rows: CFG baseline vs SoftCFG on ImageNet 256x256 (50k samples, ADM metrics).
#   scripts/table1_alitok.sh xl                 # or b, l;  NPROC=8 SEEDS="0 1 2" ... see common.sh
#   SMOKE=1 scripts/table1_alitok.sh xl         # CPU end-to-end check with the tiny golden models
# Rows: RESULTS/table1_alitok/rows/*.json; table: RESULTS/table1_alitok/results.md (+ .csv).
source "$(dirname "$0")/common.sh"
size="${1:-}"
[[ "$size" =~ ^(b|l|xl)$ ]] || usage_error "usage: scripts/table1_alitok.sh {b,l,xl} (got '${size}')"
model="alitok_$size"
table=table1_alitok

if [[ "$size" == xl ]]; then
  # The paper's known settings for AliTok-XL (SPEC section 1).
  setting $table $model CFG --guidance-scale 13 --guidance-scale-pow 1.4 --softcfg-strength 0
  setting $table $model SoftCFG --guidance-scale 9 --guidance-scale-pow 1.5 --softcfg-strength 1 --step-norm true
else
  # No published SoftCFG schedule for B/L: both methods use the config's (upstream) CFG schedule.
  setting $table $model CFG --softcfg-strength 0
  setting $table $model SoftCFG --softcfg-strength 1 --step-norm true
fi
collect $table CFG  # the CFG baseline of every paired delta
