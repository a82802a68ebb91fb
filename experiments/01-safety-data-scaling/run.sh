#!/usr/bin/env bash
# Experiment 1: safety data scaling (Llama 2 Fig. 15; Safety-Tuned LLaMAs). SFT on 150 benign
# Alpaca seed tasks plus N safety examples (from none through a few percent of the mixture to all
# 2,483), seeds 0, 1 and 2 each; refusals on harmful prompts, false refusals on benign and on
# borderline prompts, the safety reward model's score of the answers to the harmful prompts. The
# raw outputs go to raw/ beside this script; tools/scaling.py rebuilds RESULTS.md's tables.
source "$(dirname "$0")/../lib.sh"
HERE="$ROOT/experiments/01-safety-data-scaling"
RECIPE="$HERE/safety-sft.toml"
OUT="$WORK/scaling"
SIZES="${SIZES-0 5 10 25 50 100 300 2483}"
SEEDS_RUN="${SEEDS_RUN-0 1 2}"
require_data
mkdir -p "$OUT"
begin_stages "$OUT"

# mixture RECIPE N SEED: the SFT mixture's examples and tokens as the recipe selects them.
mixture() {
  "$TRAIN" data inspect --recipe "$1" --set "model.tokenizer=\"$TOKENIZER\"" \
    --set "data.sources=$(scaling_sources "$2")" --set "train.seed=$3" --n 0 --json > "$OUT/data-$2-$3.json"
}

# scaling_run N-SEED: the mixture's statistics, the SFT run and its evaluation.
scaling_run() {
  local n="${1%-*}" seed="${1#*-}"
  stage "scaling-data-$1" mixture "$RECIPE" "$n" "$seed"
  stage "scaling-sft-$1" scaling_sft "$RECIPE" "$n" "$seed"
  stage "scaling-eval-$1" evaluate "$(checkpoint "$OUT/sft-$1")" "$OUT/eval-$1.json"
}

stage data prepare_benign
stage safety-rm safety_reward_model "$SAFETY_RM_RECIPE"
runs=()
for seed in $SEEDS_RUN; do
  for n in $SIZES; do runs+=("$n-$seed"); done
done
parallel scaling_run "${runs[@]}"
stage_times "$OUT/stage-times.json"
"$PYTHON" "$ROOT/experiments/tools/scaling.py" collect "$OUT" "$HERE"
