# Shared by the table scripts (source it). Knobs come from the environment:
#   SMOKE=1     tiny golden models, 4 samples, random Inception: a CI run, NOT real numbers
#   SEEDS       "0" (default) or e.g. "0 1 2": each setting once per seed, tables show mean ± std
#   RESULTS     results/ (SMOKE: results_smoke/)       NUM_SAMPLES  50000 (SMOKE: 4)
#   NPROC       processes per run (>1: python -m torch.distributed.run)
#   WEIGHTS     checkpoint folder (weights/)           REF  reference npz (WEIGHTS/VIRTUAL_imagenet256_labeled.npz)
#   INCEPTION   FID Inception weights (default: pt_inception-2015-12-05-6726825d.pth in WEIGHTS, else the
#               evaluator's search); every input is checked before a model's first setting
#   BOOTSTRAP   bootstrap resamples: each row's std and 95% interval (default 100), paired deltas (200)
#   DOWNLOAD=1  fetch and verify every official file of a model first (softcfg-download)
#   IN_PROCESS  sampler and evaluator inside run_setting.py's process (default: SMOKE on one process)
#   SAMPLES     none (default): metrics computed while sampling, no images kept | shards: also the
#               images, one npz per batch | png: PNGs + npz, then the evaluator (upstream's way)
#   BATCH, DEVICE, WANDB=1, DELETE_SAMPLES=1, PYTHON  see scripts/run_setting.py --help
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
SEEDS="${SEEDS:-0}"
if [[ "${SMOKE:-0}" == 1 ]]; then RESULTS="${RESULTS:-results_smoke}"; else RESULTS="${RESULTS:-results}"; fi
export RESULTS  # run_setting.py reads the other knobs from the environment itself
ORDER=0
[[ "$SEEDS" =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)*[[:space:]]*$ ]] || {
  echo "SEEDS must be whole numbers separated by spaces, e.g. SEEDS=\"0 1 2\"; got '$SEEDS'" >&2; exit 2; }

CHECKED=" "  # models whose inputs were checked in this script, space separated

# setting TABLE MODEL METHOD [run_setting.py options]: sample + evaluate + row, once per seed.
# Before a model's first setting, run_setting.py --check-only checks every input of the model
# (checkpoints, reference batch, Inception weights) and lists all problems: a bad file found
# after the first rows ran would cost their hours of sampling.
setting() {
  local table=$1 model=$2 method=$3 seed
  shift 3
  ORDER=$((ORDER + 1))  # rows keep the order in which the script lists its settings
  if [[ "$CHECKED" != *" $model "* ]]; then
    if [[ "${DOWNLOAD:-0}" == 1 && "${SMOKE:-0}" != 1 ]]; then  # every official file of the model, verified
      local wanted=("$model")
      [[ -n "${REF:-}" ]] || wanted+=(reference)
      [[ -n "${INCEPTION:-}" ]] || wanted+=(inception)
      "$PYTHON" -m softcfg_patch.download "${wanted[@]}" --dir "${WEIGHTS:-weights}"
    fi
    "$PYTHON" "$REPO/scripts/run_setting.py" --check-only --table "$table" --model "$model" --method "$method" "$@"
    CHECKED+="$model "
  fi
  for seed in $SEEDS; do
    "$PYTHON" "$REPO/scripts/run_setting.py" --table "$table" --model "$model" --method "$method" \
      --order "$ORDER" --seed "$seed" "$@"
  done
}

# collect TABLE [BASELINE]: RESULTS/TABLE/results.md and results.csv from the rows; with BASELINE
# (the method label of the CFG row, e.g. CFG), every other row gets its paired FID delta to the
# BASELINE row of the same seed.
collect() {
  "$PYTHON" "$REPO/scripts/collect_results.py" "$RESULTS/$1" ${2:+--baseline "$2"}
}

usage_error() {
  echo "$1" >&2
  exit 2
}

# sweep_grid MODEL: two lines, the default scales and schedule powers of MODEL's family (its
# registry entry, softcfg_patch/run/registry.py); a message and status 2 for an unknown MODEL.
sweep_grid() {
  (cd "$REPO" && "$PYTHON" -c 'import sys; from softcfg_patch.run import registry as r
m = sys.argv[1]
if m not in r.model_names(): sys.exit("MODEL must be one of " + " ".join(r.model_names()) + f", got {m!r}")
print("\n".join(r.get(m).sweep_grid))' "$1")
}
