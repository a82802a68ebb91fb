#!/usr/bin/env python3
"""Experiment 5's numbers: collected from a run into raw/, and rebuilt from raw/ into the table of
RESULTS.md.

Usage: dpo_vs_ppo.py collect OUT_DIR HERE | table HERE | plot HERE | check HERE (see common.main;
OUT_DIR is $WORK/dpo-vs-ppo)

raw/ holds, per method m in {dpo, ppo, grpo} and seed s: eval-m-s.json (train eval safety),
eval-m-s.answers.jsonl.gz (every answer), kl-m-s.json (train eval kl), m-s.time.json (training
wall-clock), m-s.metrics.jsonl (training metrics); and eval-sft.json(.answers.jsonl.gz) for the
SFT model. Intervals are 95% t-intervals over the seeds (t = 4.303 for 3 seeds).
"""
import glob
import os
import shutil

import common

METHODS = [("dpo", "DPO"), ("ppo", "PPO (GAE)"), ("grpo", "GRPO")]


load = common.load
interval = common.interval


def harmful_score(report):
    """Mean safety reward-model score of the answers to the harmful prompt sets."""
    return common.safety_score(report, common.HARMFUL)


def degeneracy(raw, name):
    """Degeneration of every answer of the evaluation (harmful and benign): common.degeneracy."""
    path = os.path.join(raw, f"eval-{name}.answers.jsonl.gz")
    if not os.path.exists(path):
        return {}
    return common.degeneracy([a["answer"] for a in common.load_jsonl(path)])


def per_run(raw, name):
    report = load(os.path.join(raw, f"eval-{name}.json"))
    row = {
        "refusal_rate": common.refusal(report, common.HARMFUL),
        "false_refusal_rate": common.refusal(report, common.BENIGN),
        "harmful_safety_score": harmful_score(report),
        **degeneracy(raw, name),
    }
    kl = os.path.join(raw, f"kl-{name}.json")
    if os.path.exists(kl):
        row["kl_to_sft"] = load(kl)["kl_mean"]
    time = os.path.join(raw, f"{name}.time.json")
    if os.path.exists(time):
        row["train_seconds"] = load(time)["seconds"]
    return row


def results(raw):
    out = {"sft": per_run(raw, "sft"), "methods": {}}
    for key, _ in METHODS:
        seeds = sorted(int(p.split("-")[-1][:-5]) for p in glob.glob(os.path.join(raw, f"eval-{key}-*.json")))
        runs = {str(s): per_run(raw, f"{key}-{s}") for s in seeds}
        summary = {}
        for metric in ["refusal_rate", "false_refusal_rate", "harmful_safety_score", "kl_to_sft",
                       "empty_answers", "repetitive_answers", "distinct_2", "train_seconds"]:
            values = [r[metric] for r in runs.values() if r.get(metric) is not None]
            if values:
                mean, half = interval(values)
                summary[metric] = {"mean": mean, "ci95": half, "seeds": values}
        out["methods"][key] = {"seeds": runs, "summary": summary}
    return out


def cell(summary, metric, scale=1.0, digits=2):
    return common.cell(summary.get(metric), scale, digits)


def table(res):
    lines = [
        "| model | refusal, harmful prompts (%) | false refusal, benign prompts (%) | safety RM score, harmful prompts | KL to the SFT model (nats per answer) | empty answers (%) | repetitive answers (%) | distinct-2 | training wall-clock (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sft = res["sft"]
    lines.append(
        f"| SFT, 100 safety examples (the start) | {100 * sft['refusal_rate']:.1f} | "
        f"{100 * sft['false_refusal_rate']:.1f} | {sft['harmful_safety_score']:.2f} | 0 | "
        f"{100 * sft['empty_answers']:.1f} | {100 * sft['repetitive_answers']:.1f} | {sft['distinct_2']:.3f} | - |"
    )
    for key, label in METHODS:
        s = res["methods"][key]["summary"]
        if not s:
            continue
        lines.append(
            f"| {label} | {cell(s, 'refusal_rate', 100, 1)} | {cell(s, 'false_refusal_rate', 100, 1)} | "
            f"{cell(s, 'harmful_safety_score')} | {cell(s, 'kl_to_sft')} | {cell(s, 'empty_answers', 100, 1)} | "
            f"{cell(s, 'repetitive_answers', 100, 1)} | {cell(s, 'distinct_2', 1, 3)} | {cell(s, 'train_seconds', 1, 0)} |"
        )
    return "\n".join(lines)


def plot(p, res, here):
    panels = [
        ("refusal_rate", 100, "refusal, harmful prompts (%)"),
        ("false_refusal_rate", 100, "false refusal, benign prompts (%)"),
        ("harmful_safety_score", 1, "safety RM score, harmful prompts"),
        ("kl_to_sft", 1, "KL to the SFT model (nats/answer)"),
    ]
    panels.append(("empty_answers", 100, "empty answers (%)"))
    panels.append(("repetitive_answers", 100, "repetitive answers (%)"))
    fig, axes = p.subplots(2, 3, figsize=(15, 7.5))
    axes = [ax for row in axes for ax in row]
    names = ["SFT"] + [label for _, label in METHODS]
    for ax, (metric, scale, title) in zip(axes, panels):
        sft = res["sft"].get(metric, 0.0 if metric == "kl_to_sft" else None)
        means, errs, points = [sft * scale if sft is not None else 0.0], [0.0], [[]]
        for key, _ in METHODS:
            s = res["methods"][key]["summary"].get(metric)
            means.append(s["mean"] * scale if s else 0.0)
            errs.append((s["ci95"] or 0.0) * scale if s else 0.0)
            points.append([v * scale for v in s["seeds"]] if s else [])
        ax.bar(range(len(names)), means, yerr=errs, capsize=4, color=["C7", "C0", "C1", "C2"])
        for i, pts in enumerate(points):
            ax.scatter([i] * len(pts), pts, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(title, fontsize=10)
    fig.suptitle("DPO vs PPO (GAE) vs GRPO from one SFT model; bars: mean, error bars: 95% interval, dots: seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(here, "methods.png"), dpi=100)


def collect_raw(out_dir, raw):
    common.copy_files([os.path.join(out_dir, "*.json")], raw)
    for path in glob.glob(os.path.join(out_dir, "eval-*.answers.jsonl")):
        common.gzip_answers(path, os.path.join(raw, os.path.basename(path) + ".gz"))
    for run in glob.glob(os.path.join(out_dir, "*-[0-9]*")):
        metrics = os.path.join(run, "metrics.jsonl")
        if os.path.isdir(run) and os.path.exists(metrics):
            shutil.copy(metrics, os.path.join(raw, os.path.basename(run) + ".metrics.jsonl"))


def build(raw):
    res = results(raw)
    return res, {"table": table(res)}


if __name__ == "__main__":
    common.main(__doc__, collect_raw, build, plot)
