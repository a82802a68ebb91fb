#!/usr/bin/env bash
# Experiment 4: targeted context distillation and rejection sampling (K = 1, 2, 4, 8 answers per
# prompt), each with seeds 0, 1 and 2, from one base model: experiment 1's recipe (150 seed tasks
# and 100 safety examples, seed 0) with a system prompt on every third dialog, so the
# distillation pre-prompt is in-distribution. The safety reward model of experiment 2 picks the
# answers; the prompts are experiment 3's. Refusals, false refusals, the safety score of the
# answers to harmful prompts and degeneration against the base model. The raw outputs go to raw/
# beside this script; tools/methods.py rebuilds RESULTS.md's tables from them.
source "$(dirname "$0")/../lib.sh"
source "$ROOT/experiments/lib-methods.sh"
HERE="$ROOT/experiments/04-distillation-and-rejection-sampling"
OUT="$WORK/methods"
SEEDS_RUN="${SEEDS_RUN-0 1 2}"
require_data
mkdir -p "$OUT"
begin_stages "$OUT"
method_inputs

system_base() {
  local sources="[{path = \"$WORK/data/system-benign.jsonl\"}, {path = \"$WORK/data/system-safety.jsonl\", count = $BASE_N}]"
  "$TRAIN" sft --recipe "$1" --set "model.tokenizer=\"$TOKENIZER\"" --set "data.sources=$sources" \
    --set "train.seed=0" --set "output.dir=\"$OUT/base\"" --set "runtime.device=\"$DEVICE\"" --overwrite
}

stage system-data "$PYTHON" "$ROOT/experiments/tools/make_system_data.py" "$WORK/data/seed-train.jsonl" "$SAFETY" "$WORK/data"
stage methods-base system_base "$ROOT/experiments/01-safety-data-scaling/safety-sft.toml"
START="$(checkpoint "$OUT/base")"
cp "$OUT/base/metrics.jsonl" "$OUT/base.metrics.jsonl"
stage methods-eval-base evaluate "$START" "$OUT/eval-base.json"
common=(--set "model.checkpoint=\"$START\"" --set "model.tokenizer=\"$TOKENIZER\""
  --set "data.train=\"$WORK/data/method-prompts.jsonl\"" --set "runtime.device=\"$DEVICE\"" --overwrite)
# method_run METHOD-SEED: context distillation (distill) or rejection sampling with K answers
# per prompt (rsK) from the base with SEED, then its evaluation.
method_run() {
  local method="${1%-*}" seed="${1#*-}"
  if [ "$method" = distill ]; then
    stage "methods-$1" "$TRAIN" distill --recipe "$HERE/distill.toml" "${common[@]}" \
      --set "distill.safety_reward_model=\"$RM\"" --set "train.seed=$seed" --set "output.dir=\"$OUT/$1\""
  else
    stage "methods-$1" "$TRAIN" rs --recipe "$HERE/rs.toml" "${common[@]}" \
      --set "rs.reward_model=\"$RM\"" --set "rs.samples_per_prompt=${method#rs}" --set "train.seed=$seed" \
      --set "output.dir=\"$OUT/$1\""
  fi
  stage "methods-eval-$1" evaluate "$(checkpoint "$OUT/$1/sft")" "$OUT/eval-$1.json"
}

runs=()
for seed in $SEEDS_RUN; do
  for method in ${METHODS_RUN-rs8 distill rs4 rs2 rs1}; do runs+=("$method-$seed"); done
done
parallel method_run "${runs[@]}"
stage_times "$OUT/stage-times.json"
"$PYTHON" "$ROOT/experiments/tools/methods.py" collect "$OUT" "$HERE"
