#!/usr/bin/env bash
# Rebuild the exits shipped as builtin:smollm2_135m, from the committed corpus parts alone:
#   1. the tuning data: the first CORPUS_PARTS corpus parts (default 5: parts 000-004, 895,001
#      answer tokens, what the shipped exits saw), restored byte for byte;
#   2. recipe smollm2_135m_chat on it (its 1500 steps at most, or STEPS; stops once held-out CE is flat);
#   3. scripts/ship_exits.py: bf16 exits + manifest (config, data sha256, git revision) into eetune/.
# Each run continues where the last one stopped (the tune checkpoints every 50 steps and its
# hidden-state cache is kept in the run dir), so it can be spread over several sittings:
#
#   scripts/builtin_exits.sh                # tune (or continue), then ship
#   scripts/builtin_exits.sh --tune-only    # tune (or continue); ship later
#   scripts/builtin_exits.sh optim.lr=1e-3  # extra overrides go to `eetune tune`
#   # the whole 3M-token corpus, seen once (README "Measured"; not shipped: no better than the above)
#   CORPUS_PARTS=9 STEPS=900 RUN=runs/builtin/tune DATA=runs/builtin/chat.jsonl scripts/builtin_exits.sh --tune-only
#
# On 2 AVX2 cores (float32): ~15 s per step while the first epoch fills the cache, ~8 s after.
# On 2 Xeon cores with AMX (bf16): ~4 s and 2.3-3.5 s; the shipped run stopped flat at step 1150 after 64 min.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/long/tune}
DATA=${DATA:-runs/long/chat.jsonl}
CORPUS_PARTS=${CORPUS_PARTS:-5}
mapfile -t PARTS < <(ls scripts/corpus/smollm2_chat/part-*.jsonl.gz | head -n "$CORPUS_PARTS")
[ "${#PARTS[@]}" -eq "$CORPUS_PARTS" ] || { echo "CORPUS_PARTS=$CORPUS_PARTS: only ${#PARTS[@]} parts are committed" >&2; exit 2; }
STEPS_OVERRIDE=()
[ -n "${STEPS:-}" ] && STEPS_OVERRIDE=("train.steps=$STEPS")
SHIP=true
if [ "${1:-}" = "--tune-only" ]; then SHIP=false; shift; fi

[ -e "$DATA" ] || "$PY" scripts/corpus/parts.py restore "$DATA" scripts/corpus/smollm2_chat --first "$CORPUS_PARTS"
RESUME=false
[ -e "$RUN/state" ] && RESUME=true
"$PY" -m eetune tune recipe=smollm2_135m_chat data.path="$DATA" run_dir="$RUN" "${STEPS_OVERRIDE[@]}" resume=$RESUME "$@"
if $SHIP; then
  "$PY" scripts/ship_exits.py --run-dir "$RUN" --name smollm2_135m --data-parts "${PARTS[@]}" \
    --note "smollm2_135m_chat on the first $CORPUS_PARTS chat corpus parts; scripts/builtin_exits.sh"
fi
