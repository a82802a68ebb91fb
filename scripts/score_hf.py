#!/usr/bin/env python3
"""Score token sequences with a reward model in transformers (LlamaForSequenceClassification),
to check that an exported reward model scores identically there.

Usage: score_hf.py MODEL_DIR IDS_JSON [--save DIR]

IDS_JSON holds a list of token-id lists. They are scored in one right-padded batch with the
model's pad_token_id and an attention mask, so transformers reads each score at the last real
token as it does in real use. Prints one JSON line {"scores": [...], "architecture": ...}.
With --save, the loaded model is written back with transformers' own save_pretrained (the
format `train score` must import).
"""

import argparse
import json

import torch
from transformers import LlamaForSequenceClassification


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("ids")
    parser.add_argument("--save")
    args = parser.parse_args()

    torch.set_num_threads(1)
    # `dtype`: 4.56+ and 5.x (which dropped `torch_dtype`).
    model = LlamaForSequenceClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    with open(args.ids) as f:
        sequences = json.load(f)
    pad = model.config.pad_token_id
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    if args.save:
        model.save_pretrained(args.save, safe_serialization=True)
    print(json.dumps({
        "scores": scores.tolist(),
        "architecture": model.config.architectures[0],
        "num_labels": model.config.num_labels,
        "transformers": __import__("transformers").__version__,
    }))


if __name__ == "__main__":
    main()
