#!/usr/bin/env bash
# Experiment 4: targeted context distillation and rejection sampling, each from the SFT model of
# experiment 1 (100 safety examples) with the safety reward model of experiment 2, on the same
# prompts as experiment 3; refusal, false refusal and safety score against the starting model.
source "$(dirname "$0")/../lib.sh"
source "$ROOT/experiments/lib-methods.sh"
HERE="$ROOT/experiments/04-distillation-and-rejection-sampling"
require_data
base_policy
RM="$(checkpoint "$WORK/safety-rm")"
common=(--set "model.checkpoint=\"$BASE\"" --set "model.tokenizer=\"$TOKENIZER\""
  --set "data.train=\"$WORK/data/method-prompts.jsonl\"" --set "runtime.device=\"$DEVICE\"")
mkdir -p "$WORK/methods"
stage methods-eval-baseline evaluate "$BASE" "$WORK/methods/eval-baseline.json"
stage methods-distill "$TRAIN" distill --recipe "$ROOT/experiments/04-distillation-and-rejection-sampling/distill.toml" \
  "${common[@]}" --set "distill.safety_reward_model=\"$RM\"" \
  --set "output.dir=\"$WORK/methods/distill\"" --overwrite
stage methods-eval-distill evaluate "$(checkpoint "$WORK/methods/distill/sft")" "$WORK/methods/eval-distill.json"
stage methods-rs "$TRAIN" rs --recipe "$ROOT/experiments/04-distillation-and-rejection-sampling/rs.toml" \
  "${common[@]}" --set "rs.reward_model=\"$RM\"" \
  --set "output.dir=\"$WORK/methods/rs\"" --overwrite
stage methods-eval-rs evaluate "$(checkpoint "$WORK/methods/rs/sft")" "$WORK/methods/eval-rs.json"
"$PYTHON" "$ROOT/experiments/tools/report.py" methods "$WORK/methods" "$HERE"
