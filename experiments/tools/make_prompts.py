#!/usr/bin/env python3
"""Builds a prompts file (JSON Lines {"prompt", "category"}) from prompt sets.

Usage: make_prompts.py OUT FILE:CATEGORY...
FILE is a Safety-Tuned LLaMAs evaluation file ({"instructions": [...]}) or alpaca records
(instruction, input). Standard library only.
"""
import json
import sys


def prompts(path):
    with open(path) as f:
        text = f.read()
    try:
        value = json.loads(text)
        if isinstance(value, dict) and "instructions" in value:
            return value["instructions"]
    except json.JSONDecodeError:
        pass
    out = []
    for line in text.splitlines():
        if line.strip():
            r = json.loads(line)
            out.append(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""))
    return out


def main() -> None:
    out = sys.argv[1]
    count = 0
    with open(out, "w") as f:
        for spec in sys.argv[2:]:
            path, category = spec.rsplit(":", 1)
            for p in prompts(path):
                f.write(json.dumps({"prompt": p, "category": category}) + "\n")
                count += 1
    print(f"{count} prompts in {out}")


if __name__ == "__main__":
    main()
