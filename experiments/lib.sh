# Shared by the experiments' run.sh scripts: data paths, the `train` binary, and stages that
# are skipped once finished, so an interrupted experiment resumes from its last finished stage.
#
# Environment:
#   DATA    folder with data/ and tokenizers/ as in ../shared (default: ../shared beside the repo)
#   WORK    where models and intermediate files go (default: runs/experiments in the repo)
#   TRAIN   the train binary (default: target/release/train, built on first use)
#   DEVICE  flex (default), tch:cpu, cuda:0, ... (all but flex need a build with --features cli/tch)

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared}"
WORK="${WORK:-$ROOT/runs/experiments}"
DEVICE="${DEVICE:-flex}"
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
fi
mkdir -p "$WORK"

TOKENIZER="$DATA/tokenizers/llama2/tokenizer.json"
HH="$DATA/data/hh-rlhf/harmless-base-test.jsonl.gz"
SAFETY="$DATA/data/safety-tuned-llamas/safety_only_data_Instructions.json"
EVAL="$DATA/data/safety-tuned-llamas/evaluation"
SEEDS="$DATA/data/alpaca-seed-tasks/seed_tasks.jsonl"

# Fails with where to get a missing input.
require() {
  local file="$1" source="$2"
  if [ ! -e "$file" ]; then
    echo "missing $file" >&2
    echo "  get it from $source and set DATA to the folder holding data/ and tokenizers/ (see experiments/README.md)" >&2
    exit 1
  fi
}

require_data() {
  require "$TOKENIZER" "the Llama 2 tokenizer.json of meta-llama/Llama-2-7b-hf (Hugging Face), saved as tokenizers/llama2/tokenizer.json"
  require "$HH" "github.com/anthropics/hh-rlhf: harmless-base/test.jsonl.gz, saved as data/hh-rlhf/harmless-base-test.jsonl.gz"
  require "$SAFETY" "github.com/vinid/safety-tuned-llamas: data/training/safety_only_data_Instructions.json, saved under data/safety-tuned-llamas/"
  for set in I-MaliciousInstructions Q-Harm I-Alpaca I-CoNa I-Controversial I-PhysicalSafetySafe I-PhysicalSafetyUnsafe; do
    require "$EVAL/$set.json" "github.com/vinid/safety-tuned-llamas: data/evaluation/$set.json, saved under data/safety-tuned-llamas/evaluation/"
  done
  require "$SEEDS" "github.com/tatsu-lab/stanford_alpaca: seed_tasks.jsonl, saved as data/alpaca-seed-tasks/seed_tasks.jsonl"
  ensure_train
}

# The binary: TRAIN, or a release build made on first use (after the data checks pass).
ensure_train() {
  if [ -z "${TRAIN:-}" ]; then
    TRAIN="$ROOT/target/release/train"
    if [ ! -x "$TRAIN" ]; then
      (cd "$ROOT" && cargo build --release -p cli)
    fi
  fi
}

# The fingerprint of a stage: its command line, the body of the shell function it calls (if it
# calls one), the content of every file named on it outside $WORK (recipes, data; what a stage
# writes into $WORK is its output, not its input) and the train binary. A stage whose
# fingerprint changed since it finished runs again. Files a function reads without their being
# named on the stage are not in it: stages name their recipes. Nor is a stage rerun because a
# stage before it reran: after changing an earlier stage's inputs, delete the later markers.
fingerprint() {
  {
    printf '%s\n' "$@"
    if [ "$(type -t "$1")" = function ]; then declare -f "$1"; fi
    for arg in "$@"; do
      case "$arg" in
        "$WORK"/*) ;;
        *) if [ -f "$arg" ]; then sha256sum "$arg"; fi ;;
      esac
    done
    if [ -n "${TRAIN:-}" ] && [ -f "$TRAIN" ]; then sha256sum "$TRAIN"; fi
  } | sha256sum | cut -d' ' -f1
}

# stage NAME COMMAND...: runs COMMAND unless NAME finished before with the same fingerprint;
# records its time and fingerprint when it succeeds, and whether it ran or was skipped in
# $STAGE_LOG (when set) for stage_times.
stage() {
  local name="$1"
  shift
  local marker="$WORK/.done/$name"
  local print
  print="$(fingerprint "$@")"
  if [ -e "$marker" ]; then
    if grep -qx "fingerprint $print" "$marker"; then
      echo "== $name: done before, skipped"
      [ -z "${STAGE_LOG:-}" ] || echo "$name skipped" >> "$STAGE_LOG"
      return 0
    fi
    echo "== $name: its command, inputs or binary changed since it ran; running again"
  else
    echo "== $name"
  fi
  local started=$SECONDS
  "$@"
  mkdir -p "$WORK/.done"
  printf '%s s\nfingerprint %s\n' "$((SECONDS - started))" "$print" > "$marker"
  [ -z "${STAGE_LOG:-}" ] || echo "$name ran" >> "$STAGE_LOG"
}

# begin_stages OUT_DIR: start recording this script's stages and wall-clock for stage_times.
begin_stages() {
  STAGE_LOG="$1/stages.log"
  : > "$STAGE_LOG"
  STARTED=$SECONDS
}

# stage_times OUT.json: the seconds each stage this script went through took when it ran (a
# stage skipped this time keeps the time of the run that made it, perhaps another experiment's),
# which were skipped, the script's wall-clock this time and the parallel jobs it used.
stage_times() {
  {
    printf '{\n  "wall_seconds": %s,\n  "jobs": %s,\n  "stages": {' "$((SECONDS - STARTED))" "${JOBS:-2}"
    local first=1 name how
    while read -r name how; do
      [ $first = 1 ] || printf ','
      first=0
      printf '\n    "%s": {"seconds": %s, "skipped": %s}' "$name" \
        "$(head -1 "$WORK/.done/$name" | cut -d' ' -f1)" "$([ "$how" = skipped ] && echo true || echo false)"
    done < <(awk '!seen[$1]++' "$STAGE_LOG")
    printf '\n  }\n}\n'
  } > "$1"
}

# parallel FUNCTION ITEM...: FUNCTION ITEM for every item, in JOBS (default 2) lanes that each
# take every JOBS-th item in order, each lane single-threaded (RAYON_NUM_THREADS=1). With one run
# at a time flex keeps 2 cores only partly busy; two one-thread runs do nearly twice the work in
# the same time, with the same numbers (the kernels do not depend on the thread count).
parallel() {
  local fn="$1"
  shift
  local jobs="${JOBS:-2}" lane item i pids=() failed=0
  if [ "$jobs" -le 1 ]; then
    for item in "$@"; do "$fn" "$item"; done
    return
  fi
  for ((lane = 0; lane < jobs; lane++)); do
    (
      export RAYON_NUM_THREADS=1
      i=0
      for item in "$@"; do
        if [ $((i % jobs)) = "$lane" ]; then "$fn" "$item"; fi
        i=$((i + 1))
      done
    ) > >(sed -u "s/^/[lane $lane] /") 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || failed=1; done
  if [ $failed = 1 ]; then
    echo "a stage failed in a parallel lane (its output is above, prefixed by its lane)" >&2
    exit 1
  fi
}

# The benign instruction data: Alpaca's 175 seed tasks as alpaca records, the first 150 for
# training and the last 25 held out as benign evaluation prompts.
prepare_benign() {
  "$PYTHON" "$ROOT/experiments/tools/split_seed_tasks.py" "$SEEDS" "$WORK/data"
}

# scaling_sft RECIPE N SEED: experiment 1's SFT of the 150 training seed tasks plus N safety
# examples (a selection seeded by SEED) into $WORK/scaling/sft-N-SEED. Experiments 3-5 start from
# the one with 100 examples and seed 0.
scaling_sources() {
  if [ "$1" = 0 ]; then
    echo "[{path = \"$WORK/data/seed-train.jsonl\"}]"
  else
    echo "[{path = \"$WORK/data/seed-train.jsonl\"}, {path = \"$SAFETY\", count = $1}]"
  fi
}
scaling_sft() {
  "$TRAIN" sft --recipe "$1" --set "model.tokenizer=\"$TOKENIZER\"" --set "data.sources=$(scaling_sources "$2")" \
    --set "train.seed=$3" --set "output.dir=\"$WORK/scaling/sft-$2-$3\"" --set "runtime.device=\"$DEVICE\"" --overwrite
}

# safety_reward_model RECIPE: the shared safety reward model, a tiny model trained on 90% of the
# HH-RLHF harmless pairs (experiment 2's safety-rm.toml, named on the stage so that its content is
# in the fingerprint); the other experiments score answers with it.
SAFETY_RM_RECIPE="$ROOT/experiments/02-safety-reward-model/safety-rm.toml"
safety_reward_model() {
  "$TRAIN" reward --recipe "$1" \
    --set "model.tokenizer=\"$TOKENIZER\"" --set "data.train=\"$HH\"" \
    --set "output.dir=\"$WORK/safety-rm\"" --set "runtime.device=\"$DEVICE\"" --overwrite
}
# The newest checkpoint of a run directory.
checkpoint() {
  # Sort on the step after the last "checkpoint-": other hyphens in the path do not count.
  ls -d "$1"/checkpoint-* 2>/dev/null | sed 's/.*checkpoint-\([0-9]*\)$/\1 &/' | sort -n | tail -1 | cut -d' ' -f2-
}

# evaluate MODEL OUT.json: refusal rates and safety scores on the evaluation sets: harmful
# (I-MaliciousInstructions, Q-Harm), benign (I-Alpaca, the held-out seed tasks) and the borderline
# pair of I-PhysicalSafety (safe questions that sound unsafe, for false refusals, beside their
# unsafe twins).
evaluate() {
  "$TRAIN" eval safety --model "$1" --tokenizer "$TOKENIZER" --reward-model "$(checkpoint "$WORK/safety-rm")" \
    --prompts "$EVAL/I-MaliciousInstructions.json" "$EVAL/Q-Harm.json" "$EVAL/I-PhysicalSafetyUnsafe.json" \
    --benign "$EVAL/I-Alpaca.json" "$WORK/data/seed-heldout.jsonl" "$EVAL/I-PhysicalSafetySafe.json" \
    --max-new-tokens 64 --batch-size 32 --device "$DEVICE" \
    --answers "${2%.json}.answers.jsonl" --json > "$2"
}
