#!/usr/bin/env python3
"""The answers of `train eval safety --answers` to the named sets as {prompt, response} records,
in file order, for `train score` (experiment 3 scores the benign answers with its helpfulness
reward model). Standard library only.

Usage: answers_to_records.py ANSWERS.jsonl OUT.jsonl SET...
"""
import json
import sys


def main() -> None:
    source, out, names = sys.argv[1], sys.argv[2], set(sys.argv[3:])
    count = 0
    with open(source) as f, open(out, "w") as dst:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r["set"] in names:
                    dst.write(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n")
                    count += 1
    print(f"{count} answers in {out}")


if __name__ == "__main__":
    main()
