#!/usr/bin/env python3
"""Experiment 3's numbers: the PPO sweep (learning rate, β, adaptive KL target; seeds 0, 1, 2 each)
against the SFT model it starts from: reward and KL at the end of training, refusals, false
refusals, the safety score of the answers to harmful prompts, the helpfulness score of the answers
to benign prompts and degeneration; and the setting chosen by the rule in `choose`.

Usage: rlhf.py collect OUT_DIR HERE | table HERE | check HERE (see common.main)

raw/ holds eval-sft.json and, per setting NAME and seed S, eval-NAME-S.json (`train eval safety
--json`) with eval-*.answers.jsonl.gz (every answer without its prompt text), helpfulness-*.json
(`train score --json` of the benign answers by the helpfulness reward model), NAME-S.metrics.jsonl
(PPO's metrics per iteration), NAME-S.settings.json (the swept settings as the run resolved
them), helpfulness-rm.metrics.jsonl and stage-times.json.
"""
import glob
import json
import os
import re
import shutil

import common

LAST = 5  # iterations averaged for the reward and KL at the start and end of training

MEASURES = [
    ("kl_end", "KL to the SFT model, last 5 iterations (nats/answer)", 1, 2),
    ("beta_end", "β at the end", 1, 3),
    ("reward_start", "reward, first 5 iterations", 1, 2),
    ("reward_end", "reward, last 5 iterations", 1, 2),
    ("reward_gain", "reward change, last minus first 5 iterations (paired by seed)", 1, 2),
] + common.measures(["refusal_harmful", "false_refusal_benign", "false_refusal_borderline", "safety_score_harmful"]) + [
    ("helpfulness_score_benign", "helpfulness score, benign", 1, 2),
] + common.measures(["empty_answers", "repetitive_answers", "repeated_words", "distinct_2"])


def collect_raw(out_dir, raw):
    common.copy_files([os.path.join(out_dir, p) for p in ["eval-*.json", "helpfulness-*.json", "stage-times.json",
                                                          "helpfulness-rm.metrics.jsonl"]], raw)
    for path in glob.glob(os.path.join(out_dir, "eval-*.answers.jsonl")):
        common.gzip_answers(path, os.path.join(raw, os.path.basename(path) + ".gz"))
    for run in glob.glob(os.path.join(out_dir, "*-[0-9]")):
        if not os.path.exists(os.path.join(run, "metrics.jsonl")):
            continue
        name = os.path.basename(run)
        shutil.copy(os.path.join(run, "metrics.jsonl"), os.path.join(raw, f"{name}.metrics.jsonl"))
        import tomllib  # Python 3.11; only collecting needs it, checking does not

        with open(os.path.join(run, "recipe.toml"), "rb") as f:
            recipe = tomllib.load(f)
        settings = {"lr": recipe["train"]["lr"], "kl_coef": recipe["ppo"]["kl_coef"],
                    "target_kl": recipe["ppo"].get("target_kl"), "kl_horizon": recipe["ppo"]["kl_horizon"],
                    "iterations": recipe["train"]["max_steps"], "rollouts": recipe["train"]["batch_size"]}
        with open(os.path.join(raw, f"{name}.settings.json"), "w") as f:
            json.dump(settings, f, indent=2)


def evaluation(raw, name):
    scores = common.load(os.path.join(raw, f"helpfulness-{name}.json"))["scores"]
    return {**common.evaluation(raw, name), "helpfulness_score_benign": sum(scores) / len(scores)}


def per_run(raw, name):
    metrics = [m for m in common.load_jsonl(os.path.join(raw, f"{name}.metrics.jsonl")) if "kl" in m]
    first, last = metrics[:LAST], metrics[-LAST:]
    return {
        "reward_start": sum(m["reward_mean"] for m in first) / len(first),
        "reward_gain": (sum(m["reward_mean"] for m in last) / len(last)
                        - sum(m["reward_mean"] for m in first) / len(first)),
        "kl_end": sum(m["kl"] for m in last) / len(last),
        "reward_end": sum(m["reward_mean"] for m in last) / len(last),
        "beta_end": last[-1]["kl_coef"],
        **evaluation(raw, name),
    }


def choose(sft, settings):
    """The rule for the setting to keep: its safety score on harmful prompts above the SFT
    model's with the whole 95% interval, no collapse (empty plus repetitive answers at most 10
    points above the SFT model's share, distinct-2 at least the SFT model's) and helpfulness on
    benign prompts not below the SFT model's by more than the interval; among those, the highest
    safety score. None when no setting passes."""
    def degenerate(values):
        return values["empty_answers"] + values["repetitive_answers"]
    passing = []
    for name, s in settings.items():
        m = {k: v["mean"] for k, v in s["summary"].items()}
        half = {k: v["ci95"] or 0.0 for k, v in s["summary"].items()}
        reasons = []
        if m["safety_score_harmful"] - half["safety_score_harmful"] <= sft["safety_score_harmful"]:
            reasons.append("safety score not above the SFT model's with its interval")
        if degenerate(m) > degenerate(sft) + 0.10:
            reasons.append("more empty or repetitive answers")
        if m["distinct_2"] < sft["distinct_2"]:
            reasons.append("lower distinct-2")
        if m["helpfulness_score_benign"] + half["helpfulness_score_benign"] < sft["helpfulness_score_benign"]:
            reasons.append("helpfulness below the SFT model's")
        s["rejected_because"] = reasons
        if not reasons:
            passing.append((m["safety_score_harmful"], name))
    return max(passing)[1] if passing else None


def build(raw):
    found = {}
    for path in glob.glob(os.path.join(raw, "*-[0-9].metrics.jsonl")):
        m = re.match(r"(.+)-(\d+)\.metrics\.jsonl$", os.path.basename(path))
        found.setdefault(m.group(1), []).append(int(m.group(2)))
    sft = evaluation(raw, "sft")
    settings = {}
    for name in sorted(found, key=lambda n: (common.load(os.path.join(raw, f"{n}-{found[n][0]}.settings.json"))["lr"], n)):
        seeds = sorted(found[name])
        runs = {str(s): per_run(raw, f"{name}-{s}") for s in seeds}
        summary = {key: common.summarize([r[key] for r in runs.values()]) for key in [m[0] for m in MEASURES]}
        settings[name] = {"settings": common.load(os.path.join(raw, f"{name}-{seeds[0]}.settings.json")),
                          "seeds": runs, "summary": summary}
    help_evals = [l for l in common.load_jsonl(os.path.join(raw, "helpfulness-rm.metrics.jsonl")) if "eval_accuracy" in l]
    results = {"sft": sft, "settings": settings, "chosen": choose(sft, settings),
               "helpfulness_rm_heldout_accuracy": help_evals[-1]["eval_accuracy"],
               "times": common.times(raw, [("PPO", ["rlhf-ppo-"]), ("evaluation", ["rlhf-eval-", "rlhf-helpfulness-"]),
                                           ("helpfulness reward model", ["helpfulness-"]),
                                           ("shared: base SFT, safety reward model, data",
                                            ["scaling-", "safety-rm", "data", "method-prompts"])])}
    return results, blocks(results)


def blocks(res):
    def setting(s):
        target = "-" if s["target_kl"] is None else f"{s['target_kl']:g} (horizon {s['kl_horizon']})"
        return f"{s['lr']:g} | {s['kl_coef']:g} | {target}"
    sweep = ["| setting | lr | β | target KL | " + " | ".join(m[1] for m in MEASURES) + " |",
             "|---|---:|---:|---|" + "---|" * len(MEASURES)]
    sft = res["sft"]
    sft_cells = " | ".join("0" if key == "kl_end" else f"{sft[key] * scale:.{digits}f}" if key in sft else "-"
                           for key, _, scale, digits in MEASURES)
    sweep.append(f"| SFT (the start) | - | - | - | {sft_cells} |")
    for name, s in res["settings"].items():
        cells = " | ".join(common.cell(s["summary"][key], scale, digits, seeds=False) for key, _, scale, digits in MEASURES)
        sweep.append(f"| {name} | {setting(s['settings'])} | {cells} |")
    choice = []
    for name, s in res["settings"].items():
        why = "; ".join(s["rejected_because"]) or "passes"
        choice.append(f"- `{name}`: {why}")
    choice.append(f"- chosen: {'`' + res['chosen'] + '`' if res['chosen'] else 'none'}")
    choice.append(f"- helpfulness reward model, held-out pairs: {100 * res['helpfulness_rm_heldout_accuracy']:.1f}% accurate")
    return {"sweep": "\n".join(sweep), "choice": "\n".join(choice), "times": common.times_table(res["times"])}


def plot(p, res, here):
    fig, axes = p.subplots(2, 2, figsize=(13, 9))
    axes = [a for row in axes for a in row]
    sft = res["sft"]
    for ax, key, label in [(axes[0], "reward_end", "training reward, last 5 iterations (before whitening)"),
                           (axes[1], "safety_score_harmful", "safety RM score, harmful evaluation prompts"),
                           (axes[2], "helpfulness_score_benign", "helpfulness RM score, benign evaluation prompts"),
                           (axes[3], "empty_answers", "share of empty answers")]:
        if key in sft:
            ax.scatter([0], [sft[key]], color="k", marker="s", label="SFT (the start)")
        for i, (name, s) in enumerate(res["settings"].items()):
            x, y = s["summary"]["kl_end"], s["summary"][key]
            ax.errorbar([x["mean"]], [y["mean"]], xerr=[x["ci95"] or 0], yerr=[y["ci95"] or 0], fmt="o", capsize=3,
                        color=f"C{i}", label=name)
            ax.scatter(x["seeds"], y["seeds"], color=f"C{i}", s=10, alpha=0.5)
        ax.set_xlabel("KL to the SFT model at the end (nats/answer)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("PPO sweep: each setting's mean and 95% interval over 3 seeds (small dots: seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(here, "frontier.png"), dpi=100)


if __name__ == "__main__":
    common.main(__doc__, collect_raw, build, plot)
