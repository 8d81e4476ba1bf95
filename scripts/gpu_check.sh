#!/usr/bin/env bash
# The prepared GPU check: everything CUDA-specific that CPU CI never executes, in one run of
# under 10 minutes on one GPU, with every result under one output folder.
#
#   scripts/gpu_check.sh [--out DIR] [--python PATH] [--steps N] [--prompts N] [--dry-run]
#
# Steps (each one's exit code and wall time go to DIR/summary.json; a failing step does not
# stop the others):
#   1. pytest -m cuda: the CUDA test subset (tests/test_cuda.py; these skip without CUDA)
#   2. tune: a bf16 SmolLM2 tune of --steps steps on the GPU, FSDP2 under torchrun (1 process)
#   3. generate: the tuned exits decoding in full, early_exit and self_speculative mode
#   4. decode.py: our engine against transformers, bf16, on the GPU (DIR/decode/decode.json)
# --dry-run checks the arguments and that every command the steps run can be found, then
# prints the commands instead of running them (CPU CI runs it).
set -uo pipefail

usage() { sed -n '5p' "$0" | sed 's/^# *//' >&2; }

OUT=gpu_check
PY=.venv/bin/python
STEPS=20
PROMPTS=10
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --python) PY=${2:?--python needs a path}; shift 2 ;;
    --steps) STEPS=${2:?--steps needs a number}; shift 2 ;;
    --prompts) PROMPTS=${2:?--prompts needs a number}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage; exit 2 ;;
  esac
done
for n in "$STEPS" "$PROMPTS"; do
  case "$n" in ''|*[!0-9]*|0) echo "gpu_check: --steps and --prompts take a positive integer, got '$n'" >&2; exit 2 ;; esac
done

cd "$(dirname "$0")/.."
if [ ! -x "$PY" ]; then
  echo "gpu_check: no Python at $PY (run 'make setup' first, or pass --python)" >&2
  exit 2
fi
RUN_DIR="$OUT/tune"
EETUNE=("$PY" -m eetune)
DEVICE_ARGS=(model.device=cuda model.dtype=bfloat16)
TUNE_OVERRIDES=(recipe=smollm2_135m_quickstart "${DEVICE_ARGS[@]}" parallel=fsdp parallel.backend=nccl
                train.steps="$STEPS" run_dir="$RUN_DIR")

# The steps, in order; set_command NAME puts that step's command line in CMD.
STEP_NAMES=(pytest_cuda tune generate_full generate_early_exit generate_self_speculative decode)
set_command() {
  case "$1" in
    pytest_cuda) CMD=("$PY" -m pytest -q -m cuda tests/test_cuda.py --junitxml "$OUT/pytest_cuda.xml") ;;
    tune) CMD=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m eetune tune "${TUNE_OVERRIDES[@]}") ;;
    generate_*) CMD=("${EETUNE[@]}" generate "${DEVICE_ARGS[@]}" --run-dir "$RUN_DIR" --mode "${1#generate_}"
                     -n 64 --prompt "Explain what a hash table is.") ;;
    decode) CMD=("$PY" scripts/bench/decode.py --run-dir "$RUN_DIR" --device cuda --dtype bfloat16
                 --prompts "$PROMPTS" --out "$OUT/decode") ;;
  esac
}

if [ "$DRY_RUN" = 1 ]; then
  # Every command must exist: the Python modules each step runs, and the benchmark script.
  missing=0
  for module in pytest torch.distributed.run eetune.cli transformers; do
    if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null; then
      echo "gpu_check: $PY cannot import $module" >&2; missing=1
    fi
  done
  for file in tests/test_cuda.py scripts/bench/decode.py; do
    [ -f "$file" ] || { echo "gpu_check: $file is missing" >&2; missing=1; }
  done
  "$PY" scripts/bench/decode.py --help >/dev/null || { echo "gpu_check: decode.py --help failed" >&2; missing=1; }
  # The configs the steps compose must be valid (unknown keys or values fail here, not on the GPU).
  "$PY" - "${TUNE_OVERRIDES[@]}" <<'PYTHON' || missing=1
import sys
from eetune.config import compose_config
from eetune.errors import EetuneError
try:
    compose_config("tune", sys.argv[1:])
except EetuneError as exc:
    sys.exit(f"gpu_check: the tune step's config is invalid: {exc}")
PYTHON
  [ "$missing" = 0 ] || exit 1
  for name in "${STEP_NAMES[@]}"; do set_command "$name"; printf '[%s]' "$name"; printf ' %q' "${CMD[@]}"; echo; done
  echo "gpu_check: dry run ok; results would go to $OUT/"
  exit 0
fi

"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
  echo "gpu_check: torch sees no CUDA device here (use --dry-run to check the script on CPU)" >&2; exit 2; }
if [ -e "$OUT" ]; then
  echo "gpu_check: $OUT already exists; pass another --out" >&2
  exit 2
fi
mkdir -p "$OUT"
"$PY" -c "import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0)}))" \
  > "$OUT/device.json"

results=()
for name in "${STEP_NAMES[@]}"; do
  set_command "$name"
  echo "== $name: ${CMD[*]}"
  start=$EPOCHREALTIME
  "${CMD[@]}" > "$OUT/$name.log" 2>&1
  rc=$?
  seconds=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  echo "   rc=$rc in ${seconds}s (log: $OUT/$name.log)"
  results+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $seconds}")
done
(IFS=,; echo "{\"device\": $(cat "$OUT/device.json"), \"steps\": [${results[*]}]}") > "$OUT/summary.json"
echo "gpu_check: wrote $OUT/summary.json"
