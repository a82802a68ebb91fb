#!/usr/bin/env python3
"""Experiment 4's numbers: targeted context distillation and rejection sampling with K = 1, 2, 4, 8
answers per prompt (seeds 0, 1, 2 each) against the base model they start from: answers kept,
refusals, false refusals, the safety score of the answers to harmful prompts, degeneration.

Usage: methods.py collect OUT_DIR HERE | table HERE | check HERE (see common.main)

raw/ holds eval-base.json and, per method M (distill, rs1, rs2, rs4, rs8) and seed S,
eval-M-S.json (`train eval safety --json`) with eval-*.answers.jsonl.gz (every answer without its
prompt text), M-S.candidates.jsonl.gz (every candidate answer with its score and whether it was
kept, without the prompt text), M-S.metrics.jsonl (the fine-tuning's metrics);
base.metrics.jsonl and stage-times.json.
"""
import glob
import os
import re
import shutil

import common

METHODS = [("distill", "targeted context distillation"), ("rs1", "rejection sampling, K = 1"),
           ("rs2", "rejection sampling, K = 2"), ("rs4", "rejection sampling, K = 4"),
           ("rs8", "rejection sampling, K = 8")]
MEASURES = [
    ("kept", "prompts whose answer is fine-tuned on", 1, 0),
    ("eos", "candidate answers ending with EOS (%)", 100, 1),
] + common.measures(["refusal_harmful", "false_refusal_benign", "false_refusal_borderline", "safety_score_harmful",
                     "empty_answers", "repetitive_answers", "distinct_2"])


def collect_raw(out_dir, raw):
    common.copy_files([os.path.join(out_dir, p) for p in ["eval-*.json", "stage-times.json", "base.metrics.jsonl"]], raw)
    for path in glob.glob(os.path.join(out_dir, "eval-*.answers.jsonl")):
        common.gzip_answers(path, os.path.join(raw, os.path.basename(path) + ".gz"))
    for run in glob.glob(os.path.join(out_dir, "*-[0-9]")):
        name = os.path.basename(run)
        metrics = os.path.join(run, "sft", "metrics.jsonl")
        if os.path.exists(metrics):
            shutil.copy(metrics, os.path.join(raw, f"{name}.metrics.jsonl"))
        candidates = os.path.join(run, "generated", "candidates.jsonl")
        if os.path.exists(candidates):
            records = [{k: v for k, v in r.items() if k != "prompt"} for r in common.load_jsonl(candidates)]
            common.write_gzip_jsonl(records, os.path.join(raw, f"{name}.candidates.jsonl.gz"))


def per_run(raw, name):
    candidates = common.load_jsonl(os.path.join(raw, f"{name}.candidates.jsonl.gz"))
    per_prompt = int(name.split("-")[0][2:]) if name.startswith("rs") else 1
    return {"kept": sum(1 for c in candidates if c.get("kept")), "candidates": len(candidates),
            "prompts": len(candidates) // per_prompt,
            "eos": sum(1 for c in candidates if c["ended_with_eos"]) / len(candidates),
            **common.evaluation(raw, name)}


def build(raw):
    found = {}
    for path in glob.glob(os.path.join(raw, "eval-*-[0-9].json")):
        m = re.match(r"eval-(.+)-(\d+)\.json$", os.path.basename(path))
        found.setdefault(m.group(1), []).append(int(m.group(2)))
    results = {"base": common.evaluation(raw, "base"), "methods": {}}
    for key, _ in METHODS:
        if key not in found:
            continue
        runs = {str(s): per_run(raw, f"{key}-{s}") for s in sorted(found[key])}
        summary = {k: common.summarize([r[k] for r in runs.values()]) for k in [m[0] for m in MEASURES] + ["candidates", "prompts"]}
        results["methods"][key] = {"seeds": runs, "summary": summary}
    results["times"] = common.times(raw, [("base SFT with system prompts", ["methods-base"]),
                                          ("context distillation", ["methods-distill-"]),
                                          ("rejection sampling", ["methods-rs"]),
                                          ("evaluation", ["methods-eval-"]),
                                          ("shared: safety reward model, prompts, data",
                                           ["scaling-", "safety-rm", "data", "method-prompts", "system-data"])])
    return results, blocks(results)


def blocks(res):
    prompts = sorted({v for m in res["methods"].values() for v in m["summary"]["prompts"]["seeds"]})
    heads = [f"{label} (of {', '.join(str(p) for p in prompts)})" if key == "kept" else label
             for key, label, _, _ in MEASURES]
    lines = ["| model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(MEASURES)]
    base = res["base"]
    cells = " | ".join(f"{base[key] * scale:.{digits}f}" if key in base else "-" for key, _, scale, digits in MEASURES)
    lines.append(f"| base: SFT with 100 safety examples and system prompts | {cells} |")
    for key, label in METHODS:
        m = res["methods"].get(key)
        if m:
            cells = " | ".join(common.cell(m["summary"][k], scale, digits) for k, _, scale, digits in MEASURES)
            lines.append(f"| {label} | {cells} |")
    return {"methods": "\n".join(lines), "times": common.times_table(res["times"])}


def plot(p, res, here):
    names = ["base"] + [k for k, _ in METHODS if k in res["methods"]]
    panels = [("refusal_harmful", 100, "refusal, harmful (%)"), ("false_refusal_benign", 100, "false refusal, benign (%)"),
              ("false_refusal_borderline", 100, "false refusal, borderline-safe (%)"),
              ("safety_score_harmful", 1, "safety RM score, harmful prompts"),
              ("empty_answers", 100, "empty answers (%)"), ("repetitive_answers", 100, "repetitive answers (%)")]
    fig, axes = p.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, scale, title) in zip([a for row in axes for a in row], panels):
        means, errs, dots = [res["base"][key] * scale], [0.0], [[]]
        for name in names[1:]:
            s = res["methods"][name]["summary"][key]
            means.append(s["mean"] * scale)
            errs.append((s["ci95"] or 0.0) * scale)
            dots.append([v * scale for v in s["seeds"]])
        ax.bar(range(len(names)), means, yerr=errs, capsize=4, color=["C7"] + [f"C{i}" for i in range(len(names) - 1)])
        for i, pts in enumerate(dots):
            ax.scatter([i] * len(pts), pts, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Context distillation and rejection sampling; bars: mean, error bars: 95% interval, dots: seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(here, "methods.png"), dpi=100)


if __name__ == "__main__":
    common.main(__doc__, collect_raw, build, plot)
