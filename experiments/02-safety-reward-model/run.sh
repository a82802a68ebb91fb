#!/usr/bin/env bash
# Experiment 2: a safety reward model on Anthropic HH-RLHF harmless pairs, accuracy on a seeded
# 10% held out, beside the paper's Table 7 (Safety RM, 70B: 74.7% on Anthropic Harmless).
source "$(dirname "$0")/../lib.sh"
HERE="$ROOT/experiments/02-safety-reward-model"
require_data
stage safety-rm safety_reward_model
"$PYTHON" "$ROOT/experiments/tools/report.py" rm "$WORK" "$HERE"
