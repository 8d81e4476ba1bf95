#!/usr/bin/env bash
# Every measurement the README reports for shipped exits, in one command, each step timed:
#   1. eetune eval: per-exit held-out metrics, the per-exit thresholds its search finds, the engine
#      sweep with the bundled tasks' scores (ROUGE-L, F1, accuracy) per setting, and the calibrated
#      threshold (eval.out_dir, not the run dir);
#   2. decode.py: full, early_exit (learned, frequent; global thresholds and the per-exit ones eval
#      found from 0.9 and 0.8) and self_speculative (constant and adaptive drafts) side by side on
#      both prompt sets (bench, and unseen topics), 128 greedy tokens;
#   3. confidence_frontier.py: modelled speedup per confidence check at agreement floors and the
#      oracle bound, in float32 and bf16.
#
#   scripts/bench/builtin_report.sh [RUN_DIR (default builtin:smollm2_135m)] [OUT (default runs/bench/builtin)]
#   PROMPTS=4 scripts/bench/builtin_report.sh     # fewer prompts per set (default 6: 30 min in all on 2 Xeon cores, bf16)
#
# Run it on a quiet machine: every speed is a ratio within one run, but a busy core still blurs them.
# Dtype: what `model.dtype=auto` picks on this CPU (bf16 only where the CPU has bf16 units).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUN=${1:-builtin:smollm2_135m}
OUT=${2:-runs/bench/builtin}
PROMPTS=${PROMPTS:-6}
DTYPE=$("$PY" -c "from eetune.models import native_dtype; print(native_dtype('cpu'))")
# eval's held-out split needs the tuning data: the corpus parts the shipped exits were tuned on.
DATA=${DATA:-runs/long/chat.jsonl}
[ -e "$DATA" ] || "$PY" scripts/corpus/parts.py restore "$DATA" scripts/corpus/smollm2_chat --first 5
mkdir -p "$OUT"
step() { local name=$1; shift; local t0; t0=$(date +%s); echo "== $name"; "$@"; echo "   $name took $(( $(date +%s) - t0 )) s"; }

step eval "$PY" -m eetune eval recipe=smollm2_135m_chat run_dir="$RUN" data.path="$DATA" model.dtype="$DTYPE" \
    eval.thresholds=[1.0,0.9,0.8,0.7,0.6,0.4] eval.confidences=[learned,frequent] eval.out_dir="$OUT/eval"
# The per-exit thresholds eval's search found from the global 0.9 and 0.8, as decode.py's --exit-thresholds.
PER_EXIT=$("$PY" - "$OUT/eval/report.json" <<'EOF'
import json, sys
from eetune.infer.policy import describe_thresholds
found = json.load(open(sys.argv[1])).get("per_exit_thresholds", {})
print(",".join(f"{policy}:{describe_thresholds(c['thresholds'])}"
               for policy, candidates in found.items() for c in candidates if c["start"] in (0.9, 0.8)))
EOF
)
PER_EXIT_ARGS=()
[ -n "$PER_EXIT" ] && PER_EXIT_ARGS=(--exit-thresholds "$PER_EXIT")
step decode "$PY" scripts/bench/decode.py --run-dir "$RUN" --prompts "$PROMPTS" --new-tokens 128 \
    --dtype "$DTYPE" --no-hf --policies learned,frequent --thresholds 0.9,0.8,0.6 "${PER_EXIT_ARGS[@]}" \
    --spec 8:4,16:4,24:3 --draft-vocab 4096 --draft-confidence 0 --draft-schedules constant,adaptive \
    --prompt-sets bench,unseen --out "$OUT/decode"
for dtype in float32 bfloat16; do
  step "frontier $dtype" "$PY" scripts/bench/confidence_frontier.py --run-dir "$RUN" --vocab 4096 \
      --dtype "$dtype" --out "$OUT/frontier_$dtype"
done
echo "wrote $OUT/eval, $OUT/decode, $OUT/frontier_float32 and $OUT/frontier_bfloat16"
