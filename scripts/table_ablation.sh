#!/usr/bin/env bash
# Ablation on AliTok-XL (the paper's ablation table): no guidance, CFG, SoftCFG with and without
# Step Normalization, which cache tensor is scaled (V, K, KV), and the two readings of the paper
# text (confidence = max prob, alignment = token) against the released code's defaults.
#   scripts/table_ablation.sh                   # NPROC=8 SEEDS="0 1 2" ... see common.sh
#   SMOKE=1 scripts/table_ablation.sh           # all nine settings on the tiny golden model
# Settings shared with table1_alitok.sh (CFG, SoftCFG tuned) reuse its samples and evaluations.
source "$(dirname "$0")/common.sh"
[[ $# -eq 0 ]] || usage_error "usage: scripts/table_ablation.sh (no arguments; settings come from the environment)"
m=alitok_xl
t=ablation_alitok_xl
cfg=(--guidance-scale 13 --guidance-scale-pow 1.4)   # CFG's tuned schedule
tuned=(--guidance-scale 9 --guidance-scale-pow 1.5)  # SoftCFG's tuned schedule
soft=(--softcfg-strength 1 --step-norm true)

setting $t $m "No guidance" --guidance-scale 0 --softcfg-strength 0   # one unguided branch
setting $t $m "CFG" "${cfg[@]}" --softcfg-strength 0
# StepNorm on/off at CFG's schedule, so only the normalisation changes.
setting $t $m "SoftCFG w/o StepNorm" "${cfg[@]}" --softcfg-strength 1 --step-norm false
setting $t $m "SoftCFG w/ StepNorm" "${cfg[@]}" "${soft[@]}"
setting $t $m "SoftCFG tuned (V)" "${tuned[@]}" "${soft[@]}"
setting $t $m "SoftCFG tuned, K only" "${tuned[@]}" "${soft[@]}" --softcfg-target k
setting $t $m "SoftCFG tuned, K and V" "${tuned[@]}" "${soft[@]}" --softcfg-target kv
setting $t $m "SoftCFG tuned, confidence=max" "${tuned[@]}" "${soft[@]}" --softcfg-confidence max
setting $t $m "SoftCFG tuned, align=token" "${tuned[@]}" "${soft[@]}" --softcfg-align token
collect $t CFG  # the CFG baseline (tuned CFG schedule) of every paired delta
