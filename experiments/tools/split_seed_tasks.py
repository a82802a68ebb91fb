#!/usr/bin/env python3
"""Alpaca's seed tasks ({"instruction", "instances": [{"input", "output"}]}) as alpaca records:
the first 150 for training (seed-train.jsonl) and the last 25 as benign prompts for measuring
false refusals (seed-heldout.jsonl, prompts format). Standard library only.

Usage: split_seed_tasks.py seed_tasks.jsonl OUT_DIR
"""
import json
import os
import sys


def main() -> None:
    source, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    with open(source) as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    train, heldout = tasks[:150], tasks[150:]
    with open(os.path.join(out, "seed-train.jsonl"), "w") as f:
        for t in train:
            first = t["instances"][0]
            record = {"instruction": t["instruction"], "input": first["input"], "output": first["output"]}
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(out, "seed-heldout.jsonl"), "w") as f:
        for t in heldout:
            first = t["instances"][0]
            prompt = t["instruction"] + ("\n\n" + first["input"] if first["input"] else "")
            f.write(json.dumps({"prompt": prompt, "category": "helpfulness"}) + "\n")
    print(f"{len(train)} training tasks, {len(heldout)} held-out prompts in {out}")


if __name__ == "__main__":
    main()
