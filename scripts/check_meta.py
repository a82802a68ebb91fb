#!/usr/bin/env python3
"""Runs a Meta-layout directory (what `train export --meta` writes) the way Meta's reference code
does and compares its logits with a golden reference.

    check_meta.py META_DIR REFERENCE_DIR [--tolerance 1e-4]

Loads every consolidated.NN.pth with torch.load(weights_only=True) (the safe loader), joins the
model-parallel ranks, runs Meta's forward pass (meta_reference.py: complex rotary embeddings over
interleaved pairs) on each sequence of REFERENCE_DIR/golden.json, and compares with
golden.safetensors. Prints one JSON line (max_abs_diff, ranks, dtype, params); exit 1 past the
tolerance.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meta_reference  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("meta_dir", type=Path)
    ap.add_argument("reference_dir", type=Path)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the references were computed on one thread
    params = json.loads((args.meta_dir / "params.json").read_text())
    paths = sorted(args.meta_dir.glob("consolidated.*.pth"))
    shards = [torch.load(p, weights_only=True, map_location="cpu") for p in paths]
    state = meta_reference.join_shards(shards)
    golden = json.loads((args.reference_dir / "golden.json").read_text())
    reference = load_file(str(args.reference_dir / "golden.safetensors"))
    worst = 0.0
    for i, ids in enumerate(golden["sequences"]):
        logits = meta_reference.forward(state, params, ids)
        worst = max(worst, (logits - reference[f"logits_{i}"]).abs().max().item())
    print(json.dumps({
        "max_abs_diff": worst,
        "ranks": len(paths),
        "dtype": str(next(iter(state.values())).dtype),
        "params": params,
    }))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
