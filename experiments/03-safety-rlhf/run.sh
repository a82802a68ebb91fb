#!/usr/bin/env bash
# Experiment 3: safety RLHF. PPO from the SFT model of experiment 1 (100 safety examples, seed 0)
# with the safety reward model of experiment 2 and a helpfulness reward model (trained here on
# pairs built from the Alpaca seed tasks), combined by the Llama 2 rule; a sweep over the learning
# rate, β and the adaptive KL target, seeds 0, 1 and 2 each. Every policy is evaluated on the
# evaluation sets (refusals, false refusals, the safety score of the answers to harmful prompts,
# the helpfulness score of the answers to benign prompts, degeneration). The raw outputs go to
# raw/ beside this script; tools/rlhf.py rebuilds RESULTS.md's tables from them.
source "$(dirname "$0")/../lib.sh"
source "$ROOT/experiments/lib-methods.sh"
HERE="$ROOT/experiments/03-safety-rlhf"
OUT="$WORK/rlhf"
SEEDS_RUN="${SEEDS_RUN-0 1 2}"
# name:overrides (comma-separated recipe keys); the centre is safety-ppo.toml as it is.
CONFIGS="${CONFIGS-lr1e-5:train.lr=1e-5 centre: lr2e-4:train.lr=2e-4 beta0.01:ppo.kl_coef=0.01 beta0.5:ppo.kl_coef=0.5 target1:ppo.target_kl=1.0 lr2e-4-target1:train.lr=2e-4,ppo.target_kl=1.0}"
require_data
mkdir -p "$OUT"
begin_stages "$OUT"
base_policy

helpfulness_rm() {
  "$TRAIN" reward --recipe "$1" --set "model.tokenizer=\"$TOKENIZER\"" \
    --set "data.train=\"$WORK/data/helpfulness/helpfulness-train.jsonl\"" \
    --set "data.eval=\"$WORK/data/helpfulness/helpfulness-heldout.jsonl\"" \
    --set "output.dir=\"$WORK/helpfulness-rm\"" --set "runtime.device=\"$DEVICE\"" --overwrite
}

# helpfulness NAME: the helpfulness reward model's scores of the answers to the benign prompts of
# evaluation NAME.
helpfulness() {
  "$PYTHON" "$ROOT/experiments/tools/answers_to_records.py" "$OUT/eval-$1.answers.jsonl" "$OUT/benign-$1.jsonl" I-Alpaca seed-heldout
  "$TRAIN" score --model "$HELP" --data "$OUT/benign-$1.jsonl" --tokenizer "$TOKENIZER" --batch-size 16 \
    --device "$DEVICE" --json > "$OUT/helpfulness-$1.json"
}

stage helpfulness-pairs "$PYTHON" "$ROOT/experiments/tools/make_helpfulness_pairs.py" "$SEEDS" "$WORK/data/helpfulness"
stage helpfulness-rm helpfulness_rm "$HERE/helpfulness-rm.toml"
HELP="$(checkpoint "$WORK/helpfulness-rm")"
cp "$WORK/helpfulness-rm/metrics.jsonl" "$OUT/helpfulness-rm.metrics.jsonl"

# ppo_run NAME:OVERRIDES@SEED: PPO with the centre recipe and the overrides, then its evaluation.
ppo_run() {
  local config="${1%@*}" seed="${1#*@}" name o sets=() overrides
  name="${config%%:*}"
  IFS=, read -ra overrides <<< "${config#*:}"
  for o in "${overrides[@]}"; do sets+=(--set "$o"); done
  local run="$name-$seed"
  stage "rlhf-ppo-$run" "$TRAIN" ppo --recipe "$HERE/safety-ppo.toml" \
    --set "model.checkpoint=\"$BASE\"" --set "model.tokenizer=\"$TOKENIZER\"" \
    --set "data.train=\"$WORK/data/method-prompts.jsonl\"" \
    --set "ppo.reward_model=\"$HELP\"" --set "ppo.safety_reward_model=\"$RM\"" \
    "${sets[@]}" --set "train.seed=$seed" \
    --set "output.dir=\"$OUT/$run\"" --set "runtime.device=\"$DEVICE\"" --overwrite
  stage "rlhf-eval-$run" evaluate "$(checkpoint "$OUT/$run")" "$OUT/eval-$run.json"
  stage "rlhf-helpfulness-$run" helpfulness "$run"
}

stage rlhf-eval-sft evaluate "$BASE" "$OUT/eval-sft.json"
stage rlhf-helpfulness-sft helpfulness sft
runs=()
for seed in $SEEDS_RUN; do
  for config in $CONFIGS; do runs+=("$config@$seed"); done
done
parallel ppo_run "${runs[@]}"
stage_times "$OUT/stage-times.json"
"$PYTHON" "$ROOT/experiments/tools/rlhf.py" collect "$OUT" "$HERE"
