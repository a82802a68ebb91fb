#!/usr/bin/env bash
# The project's test command, the same for a user (README) and CI (.ci/run).
#
# Runs the whole suite on the pure-Rust flex backend. When libtorch is available (a venv made by
# scripts/install-libtorch.sh), the build includes the `tch` feature and the golden model tests
# run a second time on tch:cpu; the transformers export check runs when transformers is
# installed there, in transformers 4.57.1 and (from .venv/transformers5) 5.x.
# REQUIRE_TORCH=1 turns a missing libtorch/transformers into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

features=()
have_torch=0
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  have_torch=1
  eval "$(scripts/install-libtorch.sh --print-env)"
  features=(--features cli/tch)
elif [ "${REQUIRE_TORCH:-0}" = 1 ]; then
  echo "REQUIRE_TORCH=1 but .venv has no torch: run scripts/install-libtorch.sh --golden" >&2
  exit 1
else
  echo "note: no libtorch venv (.venv); testing on flex only. scripts/install-libtorch.sh adds tch:cpu." >&2
fi

if [ "$have_torch" = 1 ] && .venv/bin/python -c "import transformers" >/dev/null 2>&1; then
  export LLAMA_PYTHON="$PWD/.venv/bin/python"
elif [ "${REQUIRE_TORCH:-0}" = 1 ]; then
  echo "REQUIRE_TORCH=1 but .venv has no transformers: run scripts/install-libtorch.sh --golden" >&2
  exit 1
fi
# transformers 5.x, a PYTHONPATH overlay over .venv: exports are checked in both versions.
if [ -n "${LLAMA_PYTHON:-}" ] && PYTHONPATH=.venv/transformers5 .venv/bin/python -c \
    "import transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) < 5)" >/dev/null 2>&1; then
  export LLAMA_TRANSFORMERS5="$PWD/.venv/transformers5"
elif [ "${REQUIRE_TORCH:-0}" = 1 ]; then
  echo "REQUIRE_TORCH=1 but .venv/transformers5 has no transformers 5.x: run scripts/install-libtorch.sh --golden" >&2
  exit 1
fi

cargo test --workspace "${features[@]}"

if [ "$have_torch" = 1 ]; then
  echo "== the suite again with the model tests on tch:cpu"
  # The same cargo invocation as above (only the device differs), so nothing is rebuilt: a
  # narrower target selection would unify dev-dependency features differently and rebuild burn.
  LLAMA_TEST_DEVICE=tch:cpu cargo test --workspace "${features[@]}"
fi
