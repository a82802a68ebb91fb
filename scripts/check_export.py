#!/usr/bin/env python3
"""Check that a directory written by `train export` loads in transformers and computes the same
logits as the checkpoint it was exported from.

Usage: check_export.py SOURCE_DIR EXPORTED_DIR [--tolerance 1e-4]

Both directories are loaded with transformers.LlamaForCausalLM in float32 and run on the same
fixed token ids. Prints one JSON line {"max_abs_diff": ..., "architecture": ...} and exits 1
when the difference exceeds the tolerance (0 otherwise).
"""

import argparse
import json
import sys

import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("exported")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    source = LlamaForCausalLM.from_pretrained(args.source, torch_dtype=torch.float32).eval()
    exported = LlamaForCausalLM.from_pretrained(args.exported, torch_dtype=torch.float32).eval()
    vocab = source.config.vocab_size
    ids = torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    with torch.no_grad():
        a = source(ids).logits
        b = exported(ids).logits
    diff = (a - b).abs().max().item()
    # The tokenizer travels with the export and loads too.
    tokenizer = AutoTokenizer.from_pretrained(args.exported)
    print(json.dumps({
        "max_abs_diff": diff,
        "architecture": exported.config.architectures[0],
        "tokenizer_vocab": len(tokenizer),
    }))
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
