#!/usr/bin/env bash
# Build, or continue, the self-distilled chat corpus the SmolLM2 exits are tuned on: SmolLM2's
# own answers (temperature 0.7, top-p 0.95) to the bundled prompts, topics x templates and 4
# questions per topic it writes itself, 8 samples per prompt, 64 decoded together, until 3M
# generated tokens. Prompts on the unseen benchmark topics (scripts/bench/unseen_keywords.txt)
# are dropped. model.dtype=auto: float32 on an AVX2-only CPU (~75 tokens/s on 2 cores, ~11 hours
# in all), bf16 on one with AMX (batches 0-91 were float32, the rest bf16: the corpus meta's
# dtype_from_batch). Each run continues where the last stopped and ends by saving the new batches
# as a gzip part in scripts/corpus/smollm2_chat/ (commit it), so a fresh machine goes on from there.
#
#   scripts/corpus/smollm2_chat.sh [extra eetune overrides, e.g. distill.max_tokens=4000000]
#   scripts/corpus/smollm2_chat.sh --save     # only save what a running build has finished
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CORPUS=runs/corpus/smollm2_chat.jsonl
PARTS=scripts/corpus/smollm2_chat

save() { "$PY" scripts/corpus/parts.py save "$CORPUS" "$PARTS"; }
if [ "${1:-}" = "--save" ]; then save; exit 0; fi
if [ ! -e "$CORPUS" ] && [ -e "$PARTS/corpus.meta.json" ]; then
  "$PY" scripts/corpus/parts.py restore "$CORPUS" "$PARTS"
fi
RESUME=false
[ -e "$CORPUS" ] && RESUME=true
trap save EXIT
"$PY" -m eetune data distill model.dtype=auto \
  distill.topics=bundled distill.questions_per_topic=4 distill.samples_per_prompt=8 \
  distill.batch_size=64 distill.exclude=scripts/bench/unseen_keywords.txt \
  distill.max_tokens=3000000 distill.out="$CORPUS" resume=$RESUME "$@"
