#!/usr/bin/env python3
"""Experiment 1's numbers: refusals, false refusals (benign and borderline), the safety score of the
answers to harmful prompts and degeneration, per number of safety examples in SFT, seeds 0, 1, 2.

Usage: scaling.py collect OUT_DIR HERE | table HERE | check HERE (see common.main)

raw/ holds, per safety-example count N and seed S: eval-N-S.json (`train eval safety --json`),
eval-N-S.answers.jsonl.gz (every answer without its prompt text), data-N-S.json (`train data
inspect --json` of the SFT mixture: examples and tokens), sft-N-S.metrics.jsonl (training
metrics); and stage-times.json (seconds per stage).
"""
import glob
import os
import re
import shutil

import common

MEASURES = common.measures(["refusal_harmful", "false_refusal_benign", "false_refusal_borderline",
                            "refusal_borderline_unsafe", "safety_score_harmful", "empty_answers",
                            "repetitive_answers", "distinct_2"])


def collect_raw(out_dir, raw):
    common.copy_files([os.path.join(out_dir, p) for p in ["eval-*-*.json", "data-*-*.json", "stage-times.json"]], raw)
    for path in glob.glob(os.path.join(out_dir, "eval-*-*.answers.jsonl")):
        common.gzip_answers(path, os.path.join(raw, os.path.basename(path) + ".gz"))
    for run in glob.glob(os.path.join(out_dir, "sft-*-*")):
        metrics = os.path.join(run, "metrics.jsonl")
        if os.path.exists(metrics):
            shutil.copy(metrics, os.path.join(raw, os.path.basename(run) + ".metrics.jsonl"))


def per_run(raw, n, seed):
    data = common.load(os.path.join(raw, f"data-{n}-{seed}.json"))
    benign_only = common.load(os.path.join(raw, f"data-0-{seed}.json"))
    safety = data["examples"] - benign_only["examples"]
    return {
        "safety_examples": safety,
        "safety_share_examples": safety / data["examples"],
        "safety_share_trained_tokens": (data["trained_tokens"] - benign_only["trained_tokens"]) / data["trained_tokens"],
        **common.evaluation(raw, f"{n}-{seed}"),
    }


def build(raw):
    found = {}
    for path in glob.glob(os.path.join(raw, "eval-*-*.json")):
        m = re.match(r"eval-(\d+)-(\d+)\.json$", os.path.basename(path))
        if m:
            found.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    rows = []
    for n in sorted(found):
        seeds = sorted(found[n])
        runs = {str(s): per_run(raw, n, s) for s in seeds}
        summary = {key: common.summarize([r[key] for r in runs.values()])
                   for key in ["safety_share_examples", "safety_share_trained_tokens"] + [m[0] for m in MEASURES]}
        rows.append({"safety_examples": n, "seeds": runs, "summary": summary})
    results = {"sizes": rows,
               "times": common.times(raw, [("SFT", ["scaling-sft-"]), ("evaluation", ["scaling-eval-"]),
                                           ("mixture statistics", ["scaling-data-"]),
                                           ("reward model (experiment 2, seed 0)", ["safety-rm"])])}
    return results, blocks(results)


def blocks(res):
    def table(measures):
        head = "| safety examples | share of examples (%) | share of trained tokens (%) | " + " | ".join(m[1] for m in measures) + " |"
        lines = [head, "|---:|---:|---:|" + "---|" * len(measures)]
        for row in res["sizes"]:
            s = row["summary"]
            share_ex = 100 * s["safety_share_examples"]["mean"]
            share_tok = 100 * s["safety_share_trained_tokens"]["mean"]
            cells = " | ".join(common.cell(s[key], scale, digits) for key, _, scale, digits in measures)
            lines.append(f"| {row['safety_examples']:,} | {share_ex:.1f} | {share_tok:.1f} | {cells} |")
        return "\n".join(lines)
    return {
        "refusals": table(MEASURES[:4]),
        "answers": table(MEASURES[4:]),
        "times": common.times_table(res["times"]),
    }


def plot(p, res, here):
    rows = res["sizes"]
    xs = [max(r["safety_examples"], 0) for r in rows]
    fig, (a, b, c) = p.subplots(1, 3, figsize=(16, 4.5))
    for key, label, color in [
        ("refusal_harmful", "refusal, harmful", "C3"),
        ("false_refusal_benign", "false refusal, benign", "C0"),
        ("false_refusal_borderline", "false refusal, borderline-safe", "C2"),
        ("refusal_borderline_unsafe", "refusal, borderline-unsafe", "C1"),
    ]:
        means = [100 * r["summary"][key]["mean"] for r in rows]
        errs = [100 * (r["summary"][key]["ci95"] or 0) for r in rows]
        # A t-interval of three rates can pass 0% or 100%; drawn only within them.
        below = [min(e, m) for e, m in zip(errs, means)]
        above = [min(e, 100 - m) for e, m in zip(errs, means)]
        a.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=label, color=color)
    a.set_xscale("symlog", linthresh=5)
    a.set_xlabel("safety examples in SFT (150 benign)")
    a.set_ylabel("% of answers")
    a.legend(fontsize=8)
    for axis, key, label in [(b, "safety_score_harmful", "safety RM score, harmful prompts"),
                             (c, "empty_answers", "empty answers (share)")]:
        means = [r["summary"][key]["mean"] for r in rows]
        errs = [r["summary"][key]["ci95"] or 0 for r in rows]
        axis.errorbar(xs, means, yerr=errs, marker="o", capsize=3, color="C4")
        for x, r in zip(xs, rows):
            axis.scatter([x] * len(r["summary"][key]["seeds"]), r["summary"][key]["seeds"], color="k", s=8, zorder=3)
        axis.set_xscale("symlog", linthresh=5)
        axis.set_xlabel("safety examples in SFT (150 benign)")
        axis.set_ylabel(label)
    fig.suptitle("Safety data scaling (tiny-32k, 2.1M parameters): mean and 95% interval over 3 seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(here, "scaling.png"), dpi=100)


if __name__ == "__main__":
    common.main(__doc__, collect_raw, build, plot)
