# Shared by experiments 3 and 4: the base policy (experiment 1's SFT model with 100 safety
# examples, safe on some prompts but not most) and the prompts RLHF, rejection sampling and
# context distillation learn from: I-CoNa and I-Controversial (safety; not among the evaluation
# sets) and the 150 training seed tasks (helpfulness).
BASE_N=100
method_inputs() {
  stage data prepare_benign
  stage safety-rm safety_reward_model "$SAFETY_RM_RECIPE"
  stage method-prompts "$PYTHON" "$ROOT/experiments/tools/make_prompts.py" "$WORK/data/method-prompts.jsonl" \
    "$EVAL/I-CoNa.json:safety" "$EVAL/I-Controversial.json:safety" "$WORK/data/seed-train.jsonl:helpfulness"
  RM="$(checkpoint "$WORK/safety-rm")"
}
base_policy() {
  method_inputs
  stage "scaling-sft-$BASE_N-0" scaling_sft "$ROOT/experiments/01-safety-data-scaling/safety-sft.toml" "$BASE_N" 0
  BASE="$(checkpoint "$WORK/scaling/sft-$BASE_N-0")"
}
