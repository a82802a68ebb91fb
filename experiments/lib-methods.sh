# Shared by experiments 3 and 4: the base policy (experiment 1's SFT model with 100 safety
# examples, safe on some prompts but not most) and the prompts RLHF, rejection sampling and
# context distillation learn from: I-CoNa and I-Controversial (safety; not among the evaluation
# sets) and the 150 training seed tasks (helpfulness).
BASE_N=100
base_policy() {
  stage data prepare_benign
  stage safety-rm safety_reward_model
  local sources="[{path = \"$WORK/data/seed-train.jsonl\"}, {path = \"$SAFETY\", count = $BASE_N}]"
  stage "scaling-sft-$BASE_N" "$TRAIN" sft --recipe "$ROOT/experiments/01-safety-data-scaling/safety-sft.toml" \
    --set "model.tokenizer=\"$TOKENIZER\"" --set "data.sources=$sources" \
    --set "output.dir=\"$WORK/scaling/sft-$BASE_N\"" --set "runtime.device=\"$DEVICE\"" --overwrite
  stage method-prompts "$PYTHON" "$ROOT/experiments/tools/make_prompts.py" "$WORK/data/method-prompts.jsonl" \
    "$EVAL/I-CoNa.json:safety" "$EVAL/I-Controversial.json:safety" "$WORK/data/seed-train.jsonl:helpfulness"
  BASE="$(checkpoint "$WORK/scaling/sft-$BASE_N")"
}
