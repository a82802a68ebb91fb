#!/usr/bin/env bash
# The GPU check: golden checks, the tiny recipes, and benchmarks beside PyTorch's, on a GPU from
# a prebuilt release binary (no build on the GPU machine). See scripts/gpu_check.py for the steps.
#   scripts/gpu-check.sh --bundle /tmp/gpu-bundle   # here: build against libtorch 2.11 and bundle
#                                                   # (--backend cuda: burn's CUDA backend)
#   scripts/gpu-check.sh                            # there, inside the bundle: prints one JSON object
#   scripts/gpu-check.sh --dry-run                  # the same steps on flex with tiny shapes
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
