#!/usr/bin/env bash
# Guidance search with its noise floor: a cheap proxy grid over guidance scale x SoftCFG strength,
# then the best CFG and the best SoftCFG point confirmed with more samples and several seeds,
# compared pairwise (same labels and seeds) with intervals.
#   scripts/search_guidance.sh alitok_xl            # NPROC=8 ... see common.sh
#   SCALES="7 9 11 13" STRENGTHS="0 0.5 1 2" POW=1.5 PROXY_SAMPLES=10000 FINAL_SAMPLES=50000 \
#     CONFIRM_SEEDS="0 1 2" scripts/search_guidance.sh alitok_xl
#   SMOKE=1 scripts/search_guidance.sh alitok_xl    # CPU end-to-end check with the tiny golden models
# Strength 0 is CFG. Writes RESULTS/search_MODEL/ (proxy grid: results.md, results.csv, sweep.png,
# summary.md: best points, their difference, the noise floor and the confirmation table)
# and RESULTS/search_MODEL_confirm/ (results.md with "ΔFID vs CFG"); the proxy table states its noise
# floor (one run's bootstrap std of FID at PROXY_SAMPLES): grid differences below ~2x that are noise.
source "$(dirname "$0")/common.sh"
MODEL="${1:-}"
[[ "$MODEL" =~ ^(alitok_(b|l|xl)|rar_(b|l|xl|xxl))$ ]] || \
  usage_error "usage: scripts/search_guidance.sh MODEL (alitok_{b,l,xl} or rar_{b,l,xl,xxl}; got '${MODEL}')"
if [[ "${SMOKE:-0}" == 1 ]]; then SCALES="${SCALES:-9 13}"; STRENGTHS="${STRENGTHS:-0 1}"; fi  # 4 points
SCALES="${SCALES:-$(sweep_grid "$MODEL" | sed -n 1p)}"  # the family's grid (registry)
case "$MODEL" in
  alitok_*) POW="${POW:-1.5}" ;;
  rar_*)    POW="${POW:-1.01}" ;;
esac
STRENGTHS="${STRENGTHS:-0 0.5 1 2}"
if [[ "${SMOKE:-0}" == 1 ]]; then
  # CI: the confirmation reuses the grid's runs (same N and seed); the pipeline is what is checked
  PROXY_SAMPLES="${PROXY_SAMPLES:-4}"; FINAL_SAMPLES="${FINAL_SAMPLES:-4}"; CONFIRM_SEEDS="${CONFIRM_SEEDS:-0}"
else
  PROXY_SAMPLES="${PROXY_SAMPLES:-10000}"; FINAL_SAMPLES="${FINAL_SAMPLES:-50000}"
  CONFIRM_SEEDS="${CONFIRM_SEEDS:-0 1 2}"
fi
grid="search_$MODEL"
confirm="search_${MODEL}_confirm"

# 1. the proxy grid: one seed, PROXY_SAMPLES per point
for strength in $STRENGTHS; do
  method=SoftCFG; [[ "$strength" =~ ^0*\.?0*$ ]] && method=CFG
  for scale in $SCALES; do
    SEEDS="${SEEDS%% *}" setting "$grid" "$MODEL" $method --guidance-scale "$scale" --guidance-scale-pow "$POW" \
      --softcfg-strength "$strength" --step-norm true --num-samples "$PROXY_SAMPLES"
  done
done
collect "$grid"
"$PYTHON" "$REPO/scripts/plot_sweep.py" "$RESULTS/$grid"

# 2. the best point of each method, confirmed at FINAL_SAMPLES with CONFIRM_SEEDS, paired
best_cfg=$("$PYTHON" "$REPO/scripts/collect_results.py" "$RESULTS/$grid" --best CFG)
best_soft=$("$PYTHON" "$REPO/scripts/collect_results.py" "$RESULTS/$grid" --best SoftCFG)
echo "best on the proxy grid: CFG $best_cfg | SoftCFG $best_soft"
SEEDS="$CONFIRM_SEEDS"
# shellcheck disable=SC2086  # the options are words
setting "$confirm" "$MODEL" CFG $best_cfg --num-samples "$FINAL_SAMPLES"
# shellcheck disable=SC2086
setting "$confirm" "$MODEL" SoftCFG $best_soft --num-samples "$FINAL_SAMPLES"
collect "$confirm" CFG
summary="$RESULTS/$grid/summary.md"
{ echo "# Guidance search: $MODEL"; echo
  "$PYTHON" "$REPO/scripts/collect_results.py" "$RESULTS/$grid" --search-summary
  echo "- confirmation ($FINAL_SAMPLES samples, seeds $CONFIRM_SEEDS, paired): $RESULTS/$confirm/results.md"
  echo; sed -n '/^| model/,/^$/p' "$RESULTS/$confirm/results.md"; } > "$summary"
cat "$summary"
echo "proxy grid: $RESULTS/$grid/results.md, sweep.png; confirmation: $RESULTS/$confirm/results.md"
