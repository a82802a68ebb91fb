#!/usr/bin/env bash
# Experiment 5: DPO against PPO (GAE) and GRPO, from the same SFT model (experiment 1, 100 safety
# examples) and the same safety preference data (the HH-RLHF harmless pairs: DPO trains on them
# directly, PPO and GRPO against the reward model of experiment 2 trained on them), each with
# seeds 0, 1 and 2. Every model is evaluated as in experiments 1-4 (refusals on harmful prompts,
# false refusals on benign ones, the safety reward model's score of the answers to the harmful
# prompts) and by its KL to the SFT model on sampled answers. The raw outputs go to raw/ beside
# this script; experiments/tools/dpo_vs_ppo.py rebuilds RESULTS.md's table from them.
source "$(dirname "$0")/../lib.sh"
source "$ROOT/experiments/lib-methods.sh"
HERE="$ROOT/experiments/05-dpo-vs-ppo"
OUT="$WORK/dpo-vs-ppo"
SEEDS_RUN="${SEEDS_RUN-0 1 2}"
STARTED=$SECONDS
require_data
base_policy
mkdir -p "$OUT"
RM="$(checkpoint "$WORK/safety-rm")"

# kl MODEL OUT.json: the KL to the SFT model of answers sampled at temperature 1 to 25 prompts of
# each evaluation set.
kl() {
  "$TRAIN" eval kl --model "$1" --reference "$BASE" --tokenizer "$TOKENIZER" \
    --prompts "$EVAL/I-MaliciousInstructions.json" "$EVAL/Q-Harm.json" "$EVAL/I-Alpaca.json" \
    "$WORK/data/seed-heldout.jsonl" --limit 25 --max-new-tokens 64 --temperature 1.0 --seed 7 \
    --batch-size 32 --device "$DEVICE" --json > "$2"
}

# timed NAME COMMAND...: runs COMMAND and writes its wall-clock seconds to $OUT/NAME.time.json.
timed() {
  local name="$1"
  shift
  local started
  started=$(date +%s%N)
  "$@"
  local ms=$((($(date +%s%N) - started) / 1000000))
  printf '{"seconds": %d.%03d}\n' $((ms / 1000)) $((ms % 1000)) > "$OUT/$name.time.json"
}

common=(--set "model.checkpoint=\"$BASE\"" --set "model.tokenizer=\"$TOKENIZER\"" --set "runtime.device=\"$DEVICE\"" --overwrite)
stage dvp-eval-sft evaluate "$BASE" "$OUT/eval-sft.json"
for seed in $SEEDS_RUN; do
  stage "dvp-dpo-$seed" timed "dpo-$seed" "$TRAIN" dpo --recipe "$HERE/dpo.toml" "${common[@]}" \
    --set "data.train=\"$HH\"" --set "train.seed=$seed" --set "output.dir=\"$OUT/dpo-$seed\""
  for method in ppo grpo; do
    stage "dvp-$method-$seed" timed "$method-$seed" "$TRAIN" ppo --recipe "$HERE/$method.toml" "${common[@]}" \
      --set "data.train=\"$WORK/data/method-prompts.jsonl\"" --set "ppo.safety_reward_model=\"$RM\"" \
      --set "train.seed=$seed" --set "output.dir=\"$OUT/$method-$seed\""
  done
  for method in dpo ppo grpo; do
    model="$(checkpoint "$OUT/$method-$seed")"
    stage "dvp-eval-$method-$seed" evaluate "$model" "$OUT/eval-$method-$seed.json"
    stage "dvp-kl-$method-$seed" kl "$model" "$OUT/kl-$method-$seed.json"
  done
done
printf '{"seconds": %d, "what": "the whole run.sh"}\n' $((SECONDS - STARTED)) > "$OUT/run.time.json"
"$PYTHON" "$ROOT/experiments/tools/dpo_vs_ppo.py" collect "$OUT" "$HERE"
