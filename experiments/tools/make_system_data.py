#!/usr/bin/env python3
"""Experiment 4's SFT data with system prompts: the training seed tasks (alpaca records) and the
safety examples (alpaca-style instruction/output records) as `messages` dialogs, every third one
of each with a system turn from the pool below (rotated), so that a system prompt such as the
distillation pre-prompt is something the base model has seen, and is not by itself a sign of a
harmful request. Standard library only; the same files on every run.

Usage: make_system_data.py seed-train.jsonl safety_only_data_Instructions.json OUT_DIR
"""
import json
import os
import sys

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a safe and responsible assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a friendly assistant who explains things clearly.",
]


def records(path):
    with open(path) as f:
        text = f.read()
    try:
        value = json.loads(text)
        if isinstance(value, list):
            return value
    except json.JSONDecodeError:
        pass
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def dialog(record, i):
    user = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[(i // 3) % len(SYSTEM_PROMPTS)]})
    return {"messages": messages}


def main() -> None:
    benign, safety, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    for source, name in [(benign, "system-benign.jsonl"), (safety, "system-safety.jsonl")]:
        rows = records(source)
        with open(os.path.join(out, name), "w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps(dialog(r, i)) + "\n")
        print(f"{len(rows)} dialogs in {os.path.join(out, name)}, {len(range(0, len(rows), 3))} with a system prompt")


if __name__ == "__main__":
    main()
