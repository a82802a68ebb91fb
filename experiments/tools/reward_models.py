#!/usr/bin/env python3
"""Experiment 2's numbers: the safety reward models' held-out accuracy (one and two epochs, seeds 0,
1, 2) and their accuracy on the probe set, per kind.

Usage: reward_models.py collect OUT_DIR HERE | table HERE | check HERE (see common.main)

raw/ holds rm-E-S.metrics.jsonl (training metrics of the E-epoch recipe with seed S, its
evaluations included), probe-KIND-rm-E-S.json (`train score --json` of each probe kind),
data.json (`train data inspect --json` of the reward data: pairs in training and held out) and
stage-times.json (seconds per stage).
"""
import glob
import os
import re

import common

KINDS = [
    ("refusal-vs-compliance", "harmful prompt: refusal over compliance"),
    ("helpful-vs-refusal", "benign prompt: reference answer over refusal"),
    ("real-vs-repetition", "benign prompt: reference answer over a repetition loop"),
    ("real-vs-empty", "benign prompt: reference answer over an empty answer"),
]
EPOCHS = [1, 2]
PAPER = 0.747  # Llama 2 Table 7, Safety RM 70B on Anthropic Harmless


def collect_raw(out_dir, raw):
    common.copy_files([os.path.join(out_dir, p) for p in ["*.metrics.jsonl", "probe-*.json", "data.json",
                                                          "stage-times.json"]], raw)


def runs(raw):
    """{epochs: [seed, ...]} of the committed runs."""
    found = {}
    for path in glob.glob(os.path.join(raw, "rm-*-*.metrics.jsonl")):
        m = re.match(r"rm-(\d+)-(\d+)\.metrics\.jsonl", os.path.basename(path))
        found.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return {e: sorted(s) for e, s in found.items()}


def build(raw):
    by_epochs = runs(raw)
    data = common.load(os.path.join(raw, "data.json"))
    results = {"held_out_pairs": data["eval"], "training_pairs": data["train"], "recipes": {}}
    for epochs in EPOCHS:
        seeds = by_epochs.get(epochs, [])
        finals, curves, probes = [], {}, {k: [] for k, _ in KINDS}
        margins = {k: [] for k, _ in KINDS}
        for seed in seeds:
            lines = common.load_jsonl(os.path.join(raw, f"rm-{epochs}-{seed}.metrics.jsonl"))
            evals = [(l["step"], l["eval_accuracy"]) for l in lines if "eval_accuracy" in l]
            finals.append(evals[-1][1])
            curves[str(seed)] = evals
            for kind, _ in KINDS:
                report = common.load(os.path.join(raw, f"probe-{kind}-rm-{epochs}-{seed}.json"))
                probes[kind].append(report["accuracy"])
                margins[kind].append(report["mean_margin"])
        results["recipes"][str(epochs)] = {
            "seeds": seeds,
            "held_out_accuracy": common.summarize(finals) if finals else None,
            "curves": curves,
            "probes": {k: common.summarize(v) for k, v in probes.items() if v},
            "probe_margins": {k: common.summarize(v) for k, v in margins.items() if v},
            "probe_pairs": {k: common.load(os.path.join(raw, f"probe-{k}-rm-{epochs}-{seeds[0]}.json"))["pairs"]
                            for k, _ in KINDS} if seeds else {},
        }
    one, two = results["recipes"].get("1"), results["recipes"].get("2")
    if one and two and one["seeds"] == two["seeds"]:
        results["second_epoch_change"] = common.summarize(
            [b - a for a, b in zip(one["held_out_accuracy"]["seeds"], two["held_out_accuracy"]["seeds"])])
    results["times"] = common.times(raw, [("reward model training", ["rm-", "safety-rm"]),
                                          ("probe scoring", ["probe-rm-"]), ("data", ["data", "reward-data", "make-probes"])])
    return results, blocks(results)


def blocks(res):
    n = res["held_out_pairs"]
    se = 100 * (0.25 / n) ** 0.5
    acc = [
        "| reward model | held-out harmless accuracy (%): mean ± 95% interval (seeds 0, 1, 2) |",
        "|---|---|",
    ]
    for epochs in EPOCHS:
        r = res["recipes"].get(str(epochs))
        if r and r["held_out_accuracy"]:
            label = "1 epoch (the reward model experiments 1 and 3-5 use: seed 0)" if epochs == 1 else f"{epochs} epochs"
            acc.append(f"| this repo, 2.1M parameters, from scratch, {label} | {common.cell(r['held_out_accuracy'], 100)} |")
    if "second_epoch_change" in res:
        acc.append(f"| second epoch minus first, paired by seed (points) | {common.cell(res['second_epoch_change'], 100)} |")
    acc.append(f"| Llama 2 Safety RM, 70B (paper Table 7, Anthropic Harmless) | {100 * PAPER:.1f} |")
    acc.append(f"| chance | 50.0 (standard error {se:.1f} points on {n} held-out pairs; {res['training_pairs']} training pairs) |")

    probe = ["| probe kind | pairs | accuracy, 1 epoch (%) | accuracy, 2 epochs (%) | mean margin, 1 epoch |", "|---|---:|---|---|---|"]
    one = res["recipes"].get("1") or {}
    two = res["recipes"].get("2") or {}
    for kind, label in KINDS:
        pairs = (one.get("probe_pairs") or two.get("probe_pairs") or {}).get(kind, "-")
        probe.append(
            f"| {label} | {pairs} | {common.cell((one.get('probes') or {}).get(kind), 100)} | "
            f"{common.cell((two.get('probes') or {}).get(kind), 100)} | "
            f"{common.cell((one.get('probe_margins') or {}).get(kind), 1, 2)} |")
    return {"accuracy": "\n".join(acc), "probes": "\n".join(probe), "times": common.times_table(res["times"])}


def plot(p, res, here):
    fig, (a, b) = p.subplots(1, 2, figsize=(11, 4))
    for epochs, color in zip(EPOCHS, ["C0", "C1"]):
        r = res["recipes"].get(str(epochs))
        if not r:
            continue
        for i, (seed, curve) in enumerate(sorted(r["curves"].items())):
            a.plot([s for s, _ in curve], [100 * v for _, v in curve], marker="o", color=color, alpha=0.7,
                   label=f"{epochs} epoch{'s' if epochs > 1 else ''}" if i == 0 else None)
        final = r["held_out_accuracy"]
        last_step = max(curve[-1][0] for curve in r["curves"].values())
        a.errorbar([last_step + 4 * epochs], [100 * final["mean"]], yerr=[100 * (final["ci95"] or 0)], fmt="s",
                   capsize=4, color=color)
    a.axhline(100 * PAPER, color="C3", linestyle="--", label="Llama 2 Safety RM 70B (Table 7)")
    a.axhline(50, color="gray", linestyle=":", label="chance")
    a.set_xlabel("step")
    a.set_ylabel("held-out HH-RLHF harmless accuracy (%)")
    a.set_title("lines: seeds; squares: final mean and 95% interval")
    a.legend(fontsize=8)
    width = 0.38
    for j, (epochs, color) in enumerate(zip(EPOCHS, ["C0", "C1"])):
        r = res["recipes"].get(str(epochs))
        if not r:
            continue
        xs = [i + j * width for i in range(len(KINDS))]
        sums = [r["probes"].get(k) for k, _ in KINDS]
        b.bar(xs, [100 * s["mean"] for s in sums], width, yerr=[100 * (s["ci95"] or 0) for s in sums], capsize=3,
              color=color, label=f"{epochs} epoch{'s' if epochs > 1 else ''}")
        for x, s in zip(xs, sums):
            b.scatter([x] * len(s["seeds"]), [100 * v for v in s["seeds"]], color="k", s=8, zorder=3)
    b.axhline(50, color="gray", linestyle=":")
    b.set_xticks([i + width / 2 for i in range(len(KINDS))], [k for k, _ in KINDS], rotation=15, fontsize=8)
    b.set_ylabel("probe accuracy (%)")
    b.set_title("bars: mean, error bars: 95% interval, dots: seeds")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(here, "accuracy.png"), dpi=100)


if __name__ == "__main__":
    common.main(__doc__, collect_raw, build, plot)
