#!/usr/bin/env bash
# Experiment 3: safety RLHF. PPO from the SFT model of experiment 1 (100 safety examples) against
# the safety reward model of experiment 2, on safety and benign prompts; the safety score
# distribution before and after (as the paper's Fig. 14), refusal and false-refusal rates, KL.
source "$(dirname "$0")/../lib.sh"
source "$ROOT/experiments/lib-methods.sh"
HERE="$ROOT/experiments/03-safety-rlhf"
require_data
base_policy
mkdir -p "$WORK/rlhf"
stage rlhf-eval-before evaluate "$BASE" "$WORK/rlhf/eval-before.json"
stage rlhf-ppo "$TRAIN" ppo --recipe "$ROOT/experiments/03-safety-rlhf/safety-ppo.toml" \
  --set "model.checkpoint=\"$BASE\"" --set "model.tokenizer=\"$TOKENIZER\"" \
  --set "data.train=\"$WORK/data/method-prompts.jsonl\"" \
  --set "ppo.safety_reward_model=\"$(checkpoint "$WORK/safety-rm")\"" \
  --set "output.dir=\"$WORK/rlhf/ppo\"" --set "runtime.device=\"$DEVICE\"" --overwrite
stage rlhf-eval-after evaluate "$(checkpoint "$WORK/rlhf/ppo")" "$WORK/rlhf/eval-after.json"
"$PYTHON" "$ROOT/experiments/tools/report.py" rlhf "$WORK/rlhf" "$HERE"
