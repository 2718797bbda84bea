#!/usr/bin/env bash
# Grid over guidance scale x schedule power, CFG and SoftCFG, then a table and a plot.
#   MODEL=alitok_xl SCALES="7 9 11 13" POWS="1.4 1.5" scripts/sweep.sh
#   NUM_SAMPLES=10000 scripts/sweep.sh          # a cheaper first pass (FID-10k is not FID-50k)
#   SMOKE=1 SCALES="9 13" POWS=1.4 scripts/sweep.sh
# Rows: RESULTS/sweep_<MODEL>/rows/; results.md, results.csv and sweep.png next to them.
source "$(dirname "$0")/common.sh"
[[ $# -eq 0 ]] || usage_error "usage: [MODEL=... SCALES=\"...\" POWS=\"...\"] scripts/sweep.sh"
MODEL="${MODEL:-alitok_xl}"
case "$MODEL" in
  alitok_*) SCALES="${SCALES:-7 9 11 13}"; POWS="${POWS:-1.4 1.5}" ;;  # around the known optima (9/1.5, 13/1.4)
  rar_*)    SCALES="${SCALES:-4.5 6.5 8.5}"; POWS="${POWS:-1.01 1.5}" ;;  # around RAR-L SoftCFG's 6.5/1.01
  *) usage_error "MODEL must be alitok_{b,l,xl} or rar_{b,l,xl,xxl}, got '$MODEL'" ;;
esac
table="sweep_$MODEL"

for method in CFG SoftCFG; do
  strength=0; [[ $method == SoftCFG ]] && strength=1
  for scale in $SCALES; do
    for pow in $POWS; do
      setting "$table" "$MODEL" $method --guidance-scale "$scale" --guidance-scale-pow "$pow" \
        --softcfg-strength $strength --step-norm true
    done
  done
done
collect "$table"
"$PYTHON" "$REPO/scripts/plot_sweep.py" "$RESULTS/$table"
