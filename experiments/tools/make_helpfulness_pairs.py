#!/usr/bin/env python3
"""Experiment 3's helpfulness preference data, built from the Alpaca seed tasks (there is no
human helpfulness preference data among the inputs): for each task its reference answer is
chosen over four kinds of unhelpful answer (a refusal, the reference answer of another task, a
loop of the reference's first words, an empty answer). The first 150 tasks give the training
pairs, the last 25 the held-out ones (the same split as split_seed_tasks.py). Standard library
only; the same files on every run.

Usage: make_helpfulness_pairs.py seed_tasks.jsonl OUT_DIR
"""
import json
import os
import sys

from make_probes import REFUSALS, repetition


def tasks(path):
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                t = json.loads(line)
                first = t["instances"][0]
                prompt = t["instruction"] + ("\n\n" + first["input"] if first["input"] else "")
                out.append((prompt, first["output"]))
    return out


def pairs(chunk):
    out = []
    for i, (prompt, answer) in enumerate(chunk):
        if not answer.strip():
            continue
        other = chunk[(i + 1) % len(chunk)][1]
        for rejected in [REFUSALS[i % len(REFUSALS)], other, repetition(answer, i), ""]:
            out.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
    return out


def main() -> None:
    source, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    all_tasks = tasks(source)
    for name, chunk in [("helpfulness-train.jsonl", all_tasks[:150]), ("helpfulness-heldout.jsonl", all_tasks[150:])]:
        records = pairs(chunk)
        with open(os.path.join(out, name), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"{len(records)} pairs in {os.path.join(out, name)}")


if __name__ == "__main__":
    main()
