#!/usr/bin/env python3
"""Check that a directory written by `train export` loads in transformers and computes the same
logits as the checkpoint it was exported from.

Usage: check_export.py SOURCE_DIR EXPORTED_DIR [--tolerance 1e-4]

EXPORTED_DIR is loaded with transformers.LlamaForCausalLM in float32. The reference logits are
SOURCE_DIR's golden logits when it is a golden fixture (golden.json + golden.safetensors, made by
the transformers version that wrote it, so a fixture of either pinned version can be checked with
the other); otherwise SOURCE_DIR is loaded in the same transformers and run on fixed token ids.
Prints one JSON line {"max_abs_diff": ..., "architecture": ..., "transformers": ...} and exits 1
when the difference exceeds the tolerance (0 otherwise).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

def load(path):
    # `dtype` (4.56+; 5.x dropped `torch_dtype`).
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("exported")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    exported = load(args.exported)
    source = Path(args.source)
    diff = 0.0
    with torch.no_grad():
        if (source / "golden.json").is_file():
            from safetensors.torch import load_file

            golden = json.loads((source / "golden.json").read_text())
            reference = load_file(str(source / "golden.safetensors"))
            for i, ids in enumerate(golden["sequences"]):
                got = exported(torch.tensor([ids])).logits[0]
                diff = max(diff, (got - reference[f"logits_{i}"]).abs().max().item())
        else:
            vocab = exported.config.vocab_size
            ids = torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
            ids[:, 0] = 1
            diff = (load(source)(ids).logits - exported(ids).logits).abs().max().item()
    # The tokenizer travels with the export and loads too.
    tokenizer = AutoTokenizer.from_pretrained(args.exported)
    print(json.dumps({
        "max_abs_diff": diff,
        "architecture": exported.config.architectures[0],
        "tokenizer_vocab": len(tokenizer),
        "transformers": transformers.__version__,
    }))
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
