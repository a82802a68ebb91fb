#!/usr/bin/env bash
# Experiment 2: a safety reward model on Anthropic HH-RLHF harmless pairs, accuracy on a seeded
# 10% held out, beside the paper's Table 7 (Safety RM, 70B: 74.7% on Anthropic Harmless); the
# recipe with one and with two epochs, seeds 0, 1 and 2 each; and a probe set of hand-built pairs
# (tools/make_probes.py) scored by every model, accuracy per probe kind. The raw outputs go to
# raw/ beside this script; tools/reward_models.py rebuilds RESULTS.md's tables from them.
source "$(dirname "$0")/../lib.sh"
HERE="$ROOT/experiments/02-safety-reward-model"
OUT="$WORK/reward-models"
require_data
mkdir -p "$OUT"
begin_stages "$OUT"

# reward_data RECIPE OUT.json: the reward data's counts (pairs in training and held out) as the recipe reads them.
reward_data() {
  "$TRAIN" data inspect --recipe "$1" --set "model.tokenizer=\"$TOKENIZER\"" \
    --set "data.train=\"$HH\"" --n 0 --json > "$2"
}

# probe MODEL NAME: every probe kind scored by MODEL, one `train score` report per kind.
probe() {
  local kind
  for kind in refusal-vs-compliance helpful-vs-refusal real-vs-repetition real-vs-empty; do
    "$TRAIN" score --model "$1" --data "$WORK/data/probes/$kind.jsonl" --tokenizer "$TOKENIZER" \
      --batch-size 16 --device "$DEVICE" --json > "$OUT/probe-$kind-$2.json"
  done
}

# reward_run EPOCHS-SEED: the recipe trained for EPOCHS epochs with SEED, then probed. Seed 0 with
# one epoch is the reward model experiments 1 and 3-5 score with.
reward_run() {
  local epochs="${1%-*}" seed="${1#*-}" dir
  if [ "$1" = 1-0 ]; then
    dir="$WORK/safety-rm"
    stage safety-rm safety_reward_model "$SAFETY_RM_RECIPE"
  else
    dir="$OUT/rm-$1"
    stage "rm-$1" "$TRAIN" reward --recipe "$HERE/safety-rm.toml" \
      --set "model.tokenizer=\"$TOKENIZER\"" --set "data.train=\"$HH\"" \
      --set "train.seed=$seed" --set "train.epochs=$epochs" \
      --set "output.dir=\"$dir\"" --set "runtime.device=\"$DEVICE\"" --overwrite
  fi
  cp "$dir/metrics.jsonl" "$OUT/rm-$1.metrics.jsonl"
  stage "probe-rm-$1" probe "$(checkpoint "$dir")" "rm-$1"
}

stage data prepare_benign
stage reward-data reward_data "$HERE/safety-rm.toml" "$OUT/data.json"
stage make-probes "$PYTHON" "$ROOT/experiments/tools/make_probes.py" "$EVAL/I-MaliciousInstructions.json" "$SEEDS" "$WORK/data/probes"
# Two-epoch runs first, so that the two lanes get about the same work.
parallel reward_run ${RUNS-2-0 2-1 1-0 2-2 1-1 1-2}
stage_times "$OUT/stage-times.json"
"$PYTHON" "$ROOT/experiments/tools/reward_models.py" collect "$OUT" "$HERE"
