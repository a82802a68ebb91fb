#!/usr/bin/env bash
# Creates (or reuses) a Python venv at <repo>/.venv holding the PyPI torch==2.9.0 wheel,
# whose libtorch the Rust `tch` feature (burn-tch 0.22.1 -> tch 0.22 -> libtorch 2.9.0)
# links against. Nothing is downloaded at cargo build time.
#
# Usage:
#   scripts/install-libtorch.sh              # venv + torch 2.9.0, then print the env to export
#   scripts/install-libtorch.sh --golden     # also install scripts/requirements-golden.txt, and
#                                            # requirements-golden-5.txt into .venv/transformers5
#   scripts/install-libtorch.sh --print-env  # only print the export lines (no install)
#   eval "$(scripts/install-libtorch.sh --print-env)"
#
# Environment: PYTHON (default python3) picks the interpreter used to create the venv.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="$REPO/.venv"
TORCH_VERSION="2.9.0"
PYTHON="${PYTHON:-python3}"

golden=0
print_env_only=0
for arg in "$@"; do
  case "$arg" in
    --golden) golden=1 ;;
    --print-env) print_env_only=1 ;;
    -h|--help)
      sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *) echo "install-libtorch.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

# site-packages of the venv, e.g. .venv/lib/python3.11/site-packages
site_packages() {
  "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

print_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "install-libtorch.sh: no venv at $VENV; run scripts/install-libtorch.sh first" >&2
    return 1
  fi
  local sp
  sp="$(site_packages)"
  if [ ! -d "$sp/torch/lib" ]; then
    echo "install-libtorch.sh: torch is not installed in $VENV; run scripts/install-libtorch.sh first" >&2
    return 1
  fi
  echo "export LIBTORCH_USE_PYTORCH=1"
  echo "export LD_LIBRARY_PATH=$sp/torch/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
  echo "export PATH=$VENV/bin:\$PATH"
}

if [ "$print_env_only" = 1 ]; then
  print_env
  exit 0
fi

# torch version installed in the venv, or empty. Reads package metadata only
# (importing torch takes seconds).
installed_torch() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null || true
from importlib.metadata import version, PackageNotFoundError
try:
    print(version("torch"))
except PackageNotFoundError:
    pass
PY
}

if [ -x "$VENV/bin/python" ] && [ "$(installed_torch)" = "$TORCH_VERSION" ]; then
  echo "==> reusing $VENV (torch $TORCH_VERSION already installed)" >&2
else
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating venv $VENV with $("$PYTHON" --version 2>&1)" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  echo "==> installing torch==$TORCH_VERSION from PyPI (large download: torch + its CUDA libraries)" >&2
  "$VENV/bin/python" -m pip install --disable-pip-version-check "torch==$TORCH_VERSION" >&2
fi

if [ "$golden" = 1 ]; then
  echo "==> installing $SCRIPT_DIR/requirements-golden.txt" >&2
  # Keep torch pinned while resolving the extras.
  "$VENV/bin/python" -m pip install --disable-pip-version-check \
    "torch==$TORCH_VERSION" -r "$SCRIPT_DIR/requirements-golden.txt" >&2
  # transformers 5.x beside 4.57.1: an overlay directory used through PYTHONPATH, so both
  # versions share the venv's torch. Every package is pinned (no dependency resolution).
  TF5="$VENV/transformers5"
  tf5_version="$(grep '^transformers==' "$SCRIPT_DIR/requirements-golden-5.txt" | cut -d= -f3)"
  if [ -d "$TF5/transformers-$tf5_version.dist-info" ]; then
    echo "==> reusing $TF5 (transformers $tf5_version)" >&2
  else
    echo "==> installing $SCRIPT_DIR/requirements-golden-5.txt into $TF5" >&2
    rm -rf "$TF5"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps --target "$TF5" \
      -r "$SCRIPT_DIR/requirements-golden-5.txt" >&2
  fi
  got5="$(PYTHONPATH="$TF5" "$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
  if [ "$got5" != "$tf5_version" ]; then
    echo "install-libtorch.sh: expected transformers $tf5_version in $TF5, found $got5" >&2
    exit 1
  fi
fi

# Sanity check: libtorch loads and is the expected version.
got="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
if [ "$got" != "$TORCH_VERSION" ]; then
  echo "install-libtorch.sh: expected torch $TORCH_VERSION in $VENV, found $got" >&2
  exit 1
fi
echo "==> torch $got OK in $VENV" >&2
echo "# Export this to build/run the Rust tch feature (or: eval \"\$(scripts/install-libtorch.sh --print-env)\"):" >&2
print_env
