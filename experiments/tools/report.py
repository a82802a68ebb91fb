#!/usr/bin/env python3
"""Collects an experiment's outputs into results.json and a plot (PNG) in its folder.

Usage: report.py KIND WORK_DIR OUT_DIR
  scaling  WORK/scaling/eval-N.json for each safety data size N -> scaling.png
  rm       WORK/safety-rm/metrics.jsonl                         -> accuracy.png
  rlhf     WORK/rlhf/eval-{before,after}.json and answers        -> score-distribution.png
  methods  WORK/methods/eval-{baseline,distill,rs}.json          -> methods.png
The plot needs matplotlib; without it only results.json is written.
"""
import glob
import json
import os
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def set_rate(report, name):
    for s in report["sets"]:
        if s["name"] == name:
            return s["refusal_rate"]
    return None


def summary(report):
    return {
        "refusal_I-MaliciousInstructions": set_rate(report, "I-MaliciousInstructions"),
        "refusal_Q-Harm": set_rate(report, "Q-Harm"),
        "false_refusal_I-Alpaca": set_rate(report, "I-Alpaca"),
        "false_refusal_seed-heldout": set_rate(report, "seed-heldout"),
        "refusal_rate": report["refusal_rate"],
        "false_refusal_rate": report["false_refusal_rate"],
        "safety_score_mean": (report.get("safety_score") or {}).get("mean"),
    }


def plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as p
        return p
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None


def scaling(work, out):
    rows = []
    for path in glob.glob(os.path.join(work, "eval-*.json")):
        n = int(os.path.basename(path)[len("eval-"):-len(".json")])
        rows.append({"safety_examples": n, **summary(load(path))})
    rows.sort(key=lambda r: r["safety_examples"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    p = plt()
    if p:
        xs = [r["safety_examples"] for r in rows]
        fig, (a, b) = p.subplots(1, 2, figsize=(10, 4))
        for key, label in [
            ("refusal_I-MaliciousInstructions", "refusal, I-MaliciousInstructions"),
            ("refusal_Q-Harm", "refusal, Q-Harm"),
            ("false_refusal_I-Alpaca", "false refusal, I-Alpaca"),
            ("false_refusal_seed-heldout", "false refusal, held-out seed tasks"),
        ]:
            a.plot(xs, [100 * r[key] for r in rows], marker="o", label=label)
        a.set_xscale("symlog", linthresh=100)
        a.set_xlabel("safety examples in SFT")
        a.set_ylabel("% of answers")
        a.legend(fontsize=8)
        b.plot(xs, [r["safety_score_mean"] for r in rows], marker="o", color="C4")
        b.set_xscale("symlog", linthresh=100)
        b.set_xlabel("safety examples in SFT")
        b.set_ylabel("mean safety reward-model score")
        fig.suptitle("Safety data scaling (tiny-32k, 2.1M parameters)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "scaling.png"), dpi=100)


def rm(work, out):
    lines = [json.loads(l) for l in open(os.path.join(work, "safety-rm", "metrics.jsonl"))]
    evals = [l for l in lines if "eval_accuracy" in l]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"eval": evals, "final": evals[-1]}, f, indent=2)
    p = plt()
    if p:
        fig, a = p.subplots(figsize=(6, 4))
        a.plot([e["step"] for e in evals], [100 * e["eval_accuracy"] for e in evals], marker="o",
               label="this repo, 2.1M, held-out 10%")
        a.axhline(74.7, color="C3", linestyle="--", label="Llama 2 Safety RM 70B (Table 7)")
        a.axhline(50, color="gray", linestyle=":", label="chance")
        a.set_xlabel("step")
        a.set_ylabel("accuracy on HH-RLHF harmless (%)")
        a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "accuracy.png"), dpi=100)


def rlhf(work, out):
    before, after = load(os.path.join(work, "eval-before.json")), load(os.path.join(work, "eval-after.json"))
    metrics = [json.loads(l) for l in open(os.path.join(work, "ppo", "metrics.jsonl"))]
    result = {"before": summary(before), "after": summary(after),
              "ppo_first": metrics[0], "ppo_last": metrics[-1]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    p = plt()
    if p:
        def scores(name):
            return [json.loads(l)["safety_score"] for l in open(os.path.join(work, name))]
        fig, (a, b) = p.subplots(1, 2, figsize=(10, 4))
        a.hist(scores("eval-before.answers.jsonl"), bins=30, alpha=0.6, label="SFT")
        a.hist(scores("eval-after.answers.jsonl"), bins=30, alpha=0.6, label="SFT + safety RLHF")
        a.set_xlabel("safety reward-model score")
        a.set_ylabel("answers")
        a.legend()
        b.plot([m["step"] for m in metrics], [m["reward_mean"] for m in metrics], label="reward")
        b.plot([m["step"] for m in metrics], [m["kl"] for m in metrics], label="KL to reference")
        b.set_xlabel("PPO iteration")
        b.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "score-distribution.png"), dpi=100)


def methods(work, out):
    rows = {}
    for name in ["baseline", "distill", "rs"]:
        path = os.path.join(work, f"eval-{name}.json")
        if os.path.exists(path):
            rows[name] = summary(load(path))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    p = plt()
    if p:
        names = list(rows)
        keys = [("refusal_rate", "refusal"), ("false_refusal_rate", "false refusal")]
        fig, (a, b) = p.subplots(1, 2, figsize=(10, 4))
        width = 0.35
        for i, (key, label) in enumerate(keys):
            a.bar([j + i * width for j in range(len(names))], [100 * rows[n][key] for n in names],
                  width, label=label)
        a.set_xticks([j + width / 2 for j in range(len(names))], names)
        a.set_ylabel("% of answers")
        a.legend()
        b.bar(names, [rows[n]["safety_score_mean"] for n in names], color="C4")
        b.set_ylabel("mean safety reward-model score")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "methods.png"), dpi=100)


if __name__ == "__main__":
    kind, work, out = sys.argv[1:4]
    {"scaling": scaling, "rm": rm, "rlhf": rlhf, "methods": methods}[kind](work, out)
    print(f"wrote {out}/results.json")
