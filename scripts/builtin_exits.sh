#!/usr/bin/env bash
# Rebuild the exits shipped as builtin:smollm2_135m, from the committed corpus parts alone:
#   1. the tuning data: corpus parts 000-008 (3,006,009 answer tokens), restored byte for byte;
#   2. recipe smollm2_135m_chat on it for 900 steps (1.84M tokens, 0.68 epochs: what fits a 3-hour
#      sitting beside the measurements), stopping early if held-out CE is flat;
#   3. scripts/ship_exits.py: bf16 exits + manifest (config, data sha256, git revision) into eetune/.
# Each run continues where the last one stopped (the tune checkpoints every 50 steps and its
# hidden-state cache is kept in the run dir), so it can be spread over several sittings:
#
#   scripts/builtin_exits.sh                # tune (or continue), then ship
#   scripts/builtin_exits.sh --tune-only    # tune (or continue); ship later
#   STEPS=1500 scripts/builtin_exits.sh     # longer (resume=true extends a finished run)
#   scripts/builtin_exits.sh optim.lr=1e-3  # extra overrides go to `eetune tune`
#
# On 2 AVX2 cores (float32): ~15 s per step while the first epoch fills the cache, ~8 s after.
# On 2 Xeon cores with AMX (bf16): ~4 s and 2.3-3.5 s; the shipped run stopped flat at step 1150 after 64 min.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/builtin/tune}
DATA=${DATA:-runs/builtin/chat.jsonl}
PARTS=(scripts/corpus/smollm2_chat/part-00{0,1,2,3,4,5,6,7,8}.jsonl.gz)
SHIP=true
if [ "${1:-}" = "--tune-only" ]; then SHIP=false; shift; fi

[ -e "$DATA" ] || "$PY" scripts/corpus/parts.py restore "$DATA" scripts/corpus/smollm2_chat --first ${#PARTS[@]}
RESUME=false
[ -e "$RUN/state" ] && RESUME=true
"$PY" -m eetune tune recipe=smollm2_135m_chat data.path="$DATA" run_dir="$RUN" train.steps="${STEPS:-900}" resume=$RESUME "$@"
if $SHIP; then
  "$PY" scripts/ship_exits.py --run-dir "$RUN" --name smollm2_135m --data-parts "${PARTS[@]}" \
    --note "smollm2_135m_chat on the chat corpus parts 000-008 (3,006,009 answer tokens); scripts/builtin_exits.sh"
fi
