#!/usr/bin/env python3
"""Check a LoRA run's exports against Python's peft and transformers.

Usage: check_peft.py BASE_DIR ADAPTER_DIR MERGED_DIR [--tolerance 1e-4]

BASE_DIR is the model the run trained adapters on, ADAPTER_DIR what `train export --adapter`
wrote, MERGED_DIR what `train export` wrote (the adapters merged into the base). On fixed token
ids, the logits of `PeftModel.from_pretrained(base, ADAPTER_DIR)` must equal those of MERGED_DIR
loaded as a plain LlamaForCausalLM: peft reads our adapter layout (names, transposes, scale) as we
meant it, and our merge is the same model. The adapters must also change the base's logits, so the
check cannot pass on adapters that do nothing. Prints one JSON line and exits 1 on a mismatch.
"""

import argparse
import json
import sys

import peft
import torch
import transformers
from peft import PeftModel
from transformers import LlamaForCausalLM


def load(path):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("merged")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    torch.set_num_threads(1)
    merged = load(args.merged)
    vocab = merged.config.vocab_size
    ids = torch.randint(3, vocab, (2, 13), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    with torch.no_grad():
        base_logits = load(args.base)(ids).logits
        adapted = PeftModel.from_pretrained(load(args.base), args.adapter).eval()
        peft_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
    diff = (peft_logits - merged_logits).abs().max().item()
    effect = (peft_logits - base_logits).abs().max().item()
    report = {
        "max_abs_diff": diff,
        "adapter_effect": effect,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(report))
    return 0 if diff <= args.tolerance and effect > 10 * args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
