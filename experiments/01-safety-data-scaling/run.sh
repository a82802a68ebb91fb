#!/usr/bin/env bash
# Experiment 1: safety data scaling (Llama 2 Fig. 15; Safety-Tuned LLaMAs). SFT on 150 benign
# Alpaca seed tasks plus 0, 100, 300, 1000 or all 2,483 safety examples; refusal rate on
# I-MaliciousInstructions and Q-Harm, false refusals on I-Alpaca and 25 held-out seed tasks, and
# the safety reward model's mean score, per data size. Writes results.json and scaling.png here.
source "$(dirname "$0")/../lib.sh"
HERE="$ROOT/experiments/01-safety-data-scaling"
require_data

stage data prepare_benign
stage safety-rm safety_reward_model
for n in 0 100 300 1000 2483; do
  if [ "$n" = 0 ]; then
    sources="[{path = \"$WORK/data/seed-train.jsonl\"}]"
  else
    sources="[{path = \"$WORK/data/seed-train.jsonl\"}, {path = \"$SAFETY\", count = $n}]"
  fi
  stage "scaling-sft-$n" "$TRAIN" sft --recipe "$ROOT/experiments/01-safety-data-scaling/safety-sft.toml" \
    --set "model.tokenizer=\"$TOKENIZER\"" --set "data.sources=$sources" \
    --set "output.dir=\"$WORK/scaling/sft-$n\"" --set "runtime.device=\"$DEVICE\"" --overwrite
  stage "scaling-eval-$n" evaluate "$(checkpoint "$WORK/scaling/sft-$n")" "$WORK/scaling/eval-$n.json"
done
"$PYTHON" "$ROOT/experiments/tools/report.py" scaling "$WORK/scaling" "$HERE"
