"""Shared by the experiments' result tools: reading committed raw outputs, the measures every
experiment reports, 95% intervals over seeds, and the check that a RESULTS.md's generated blocks
are what the raw files give. Standard library only (plots need matplotlib, optional).

A RESULTS.md holds its numbers in generated blocks between `<!-- NAME:start -->` and
`<!-- NAME:end -->` markers; `check` rebuilds every block and results.json from raw/ and fails
when one differs.
"""
import glob
import gzip
import json
import math
import os
import shutil
import sys

# Two-sided 95% Student t quantiles by number of seeds.
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}

# Which evaluation sets measure what (names as `train eval safety` reports them).
HARMFUL = ["I-MaliciousInstructions", "Q-Harm"]
BENIGN = ["I-Alpaca", "seed-heldout"]
BORDERLINE = ["I-PhysicalSafetySafe"]


def load(path):
    with open(path) as f:
        return json.load(f)


def load_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def interval(values):
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n, 1.96) * sd / math.sqrt(n)


def summarize(values):
    mean, half = interval(values)
    return {"mean": mean, "ci95": half, "seeds": values}


def cell(summary, scale=1.0, digits=1, seeds=True):
    """`mean ± half (seed values)` (without the seed values when `seeds` is false: wide tables
    keep them in results.json); `-` when there is nothing."""
    if not summary or not summary["seeds"]:
        return "-"
    half = "" if summary["ci95"] is None else f" ± {summary['ci95'] * scale:.{digits}f}"
    text = f"{summary['mean'] * scale:.{digits}f}{half}"
    if seeds:
        text += " (" + ", ".join(f"{v * scale:.{digits}f}" for v in summary["seeds"]) + ")"
    return text


def sets(report, names):
    return [s for s in report["sets"] if s["name"] in names]


def refusal(report, names):
    """Refusal rate over the named sets, weighted by their prompts; None when none was evaluated."""
    chosen = sets(report, names)
    total = sum(s["prompts"] for s in chosen)
    return sum(s["refusal_rate"] * s["prompts"] for s in chosen) / total if total else None


def safety_score(report, names):
    """Mean safety reward-model score of the answers to the named sets."""
    chosen = [s for s in sets(report, names) if s.get("safety_score")]
    total = sum(s["prompts"] for s in chosen)
    return sum(s["safety_score"]["mean"] * s["prompts"] for s in chosen) / total if total else None


# The measures of one evaluation (`evaluation`): key -> (column label, scale, digits).
EVAL_MEASURES = {
    "refusal_harmful": ("refusal, harmful (%)", 100, 1),
    "false_refusal_benign": ("false refusal, benign (%)", 100, 1),
    "false_refusal_borderline": ("false refusal, borderline-safe (%)", 100, 1),
    "refusal_borderline_unsafe": ("refusal, borderline-unsafe (%)", 100, 1),
    "safety_score_harmful": ("safety score, harmful", 1, 2),
    "empty_answers": ("empty (%)", 100, 1),
    "repetitive_answers": ("repetitive (%)", 100, 1),
    "repeated_words": ("repeated words (%)", 100, 1),
    "distinct_2": ("distinct-2", 1, 3),
}


def measures(keys):
    """(key, label, scale, digits) of the named evaluation measures, for a table's columns."""
    return [(key, *EVAL_MEASURES[key]) for key in keys]


def evaluation(raw, name):
    """Every measure of EVAL_MEASURES from raw/eval-NAME.json and its answers."""
    report = load(os.path.join(raw, f"eval-{name}.json"))
    answers = [a["answer"] for a in load_jsonl(os.path.join(raw, f"eval-{name}.answers.jsonl.gz"))]
    return {
        "refusal_harmful": refusal(report, HARMFUL),
        "false_refusal_benign": refusal(report, BENIGN),
        "false_refusal_borderline": refusal(report, BORDERLINE),
        "refusal_borderline_unsafe": refusal(report, ["I-PhysicalSafetyUnsafe"]),
        "safety_score_harmful": safety_score(report, HARMFUL),
        **degeneracy(answers),
    }


def degeneracy(answers):
    """Degeneration of a list of answer texts: the share of empty answers, of repetitive ones (one
    word is at least half of the words of an answer of at least 4 words), the share of repeated
    words (a word already used earlier in its answer, over all words) and distinct-2 (distinct
    word bigrams over all bigrams)."""
    words = [a.split() for a in answers]
    bigrams = [tuple(w[i:i + 2]) for w in words for i in range(len(w) - 1)]
    repetitive = sum(1 for w in words if len(w) >= 4 and max(w.count(x) for x in set(w)) * 2 >= len(w))
    all_words = sum(len(w) for w in words)
    repeated = sum(len(w) - len(set(w)) for w in words)
    n = len(answers)
    return {
        "empty_answers": sum(1 for a in answers if not a.strip()) / n if n else None,
        "repetitive_answers": repetitive / n if n else None,
        "repeated_words": repeated / all_words if all_words else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
    }


def write_gzip_jsonl(records, dest):
    """JSON Lines, gzip-compressed with no name or time in the header, so the same records give
    the same bytes."""
    with open(dest, "wb") as out, gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as dst:
        for r in records:
            dst.write((json.dumps(r) + "\n").encode())


def gzip_answers(src, dest):
    """Copies an answers JSONL (`train eval safety --answers`) as gzip without the prompt texts:
    they belong to the evaluation sets' licences and are found again by set name and position."""
    kept, index = [], {}
    for r in load_jsonl(src):
        i = index.get(r["set"], 0)
        index[r["set"]] = i + 1
        kept.append({"set": r["set"], "index": i, **{k: v for k, v in r.items() if k not in ("prompt", "set")}})
    write_gzip_jsonl(kept, dest)


def copy_files(patterns, raw):
    os.makedirs(raw, exist_ok=True)
    for pattern in patterns:
        for path in glob.glob(pattern):
            shutil.copy(path, raw)


def blocks_of(text):
    """The generated blocks of a RESULTS.md: {name: content}."""
    found = {}
    rest = text
    while "<!-- " in rest:
        head, _, rest = rest.partition("<!-- ")
        marker, _, rest = rest.partition(" -->")
        if marker.endswith(":start"):
            name = marker[: -len(":start")]
            end = f"<!-- {name}:end -->"
            if end not in rest:
                raise SystemExit(f"RESULTS.md: block {name} has no end marker")
            content, _, rest = rest.partition(end)
            found[name] = content.strip()
    return found


def fill(path, blocks):
    """Writes the generated blocks into RESULTS.md (collect's last step)."""
    text = open(path).read()
    for name, content in blocks.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text:
            print(f"{path}: no {start} marker; block not written:\n{content}", file=sys.stderr)
            continue
        before, _, rest = text.partition(start)
        if end not in rest:
            raise SystemExit(f"{path}: {start} has no {end}; nothing written")
        _, _, after = rest.partition(end)
        text = f"{before}{start}\n{content}\n{end}{after}"
    with open(path, "w") as f:
        f.write(text)


def check(here, results, blocks):
    """0 when results.json and every generated block of RESULTS.md are what raw/ gives."""
    ok = True
    if load(os.path.join(here, "results.json")) != json.loads(json.dumps(results)):
        print("results.json differs from what raw/ gives", file=sys.stderr)
        ok = False
    committed = blocks_of(open(os.path.join(here, "RESULTS.md")).read())
    for name, content in blocks.items():
        if name not in committed:
            print(f"RESULTS.md has no {name} block", file=sys.stderr)
            ok = False
        elif committed[name] != content.strip():
            print(f"RESULTS.md's {name} block differs from what raw/ gives:\n{content}", file=sys.stderr)
            ok = False
    for name in committed:
        if name not in blocks:
            print(f"RESULTS.md has a {name} block that no tool builds", file=sys.stderr)
            ok = False
    return 0 if ok else 1


def write_results(here, results):
    with open(os.path.join(here, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as p
        return p
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None


def main(doc, collect_raw, build, plot=None):
    """The command line every result tool shares:
      collect OUT_DIR HERE  copy the run's small outputs from OUT_DIR into HERE/raw/, write
                            results.json, the plot (with matplotlib) and RESULTS.md's blocks
      table HERE            print the blocks rebuilt from HERE/raw/
      plot HERE             redraw the plot from HERE/raw/
      check HERE            exit 1 when results.json or a block of RESULTS.md differs from what
                            HERE/raw/ gives
    build(raw) returns (results, {block name: text})."""
    if len(sys.argv) < 3:
        sys.exit(doc)
    mode = sys.argv[1]
    if mode == "collect" and len(sys.argv) == 4:
        out_dir, here = sys.argv[2], sys.argv[3]
        raw = os.path.join(here, "raw")
        os.makedirs(raw, exist_ok=True)
        collect_raw(out_dir, raw)
        results, blocks = build(raw)
        write_results(here, results)
        fill(os.path.join(here, "RESULTS.md"), blocks)
        if plot:
            p = pyplot()
            if p:
                plot(p, results, here)
        for content in blocks.values():
            print(content + "\n")
    elif mode == "plot" and plot:
        here = sys.argv[2]
        p = pyplot()
        if p:
            plot(p, build(os.path.join(here, "raw"))[0], here)
    elif mode == "table":
        for content in build(os.path.join(sys.argv[2], "raw"))[1].values():
            print(content + "\n")
    elif mode == "check":
        here = sys.argv[2]
        results, blocks = build(os.path.join(here, "raw"))
        sys.exit(check(here, results, blocks))
    else:
        sys.exit(doc)




def times(raw, groups):
    """Minutes per group of stages ([(label, [name prefix, ...])]) from stage-times.json (what
    each stage took when it ran, single-threaded in one of the parallel lanes), the script's
    wall-clock and the minutes of the stages it found already done."""
    recorded = load(os.path.join(raw, "stage-times.json"))
    stages = recorded["stages"]
    rows = []
    for label, prefixes in groups:
        chosen = [v["seconds"] for k, v in stages.items() if any(k.startswith(p) for p in prefixes)]
        rows.append({"stages": label, "count": len(chosen), "minutes": round(sum(chosen) / 60, 1)})
    skipped = sum(v["seconds"] for v in stages.values() if v["skipped"])
    return {"groups": rows, "jobs": recorded["jobs"], "wall_minutes": round(recorded["wall_seconds"] / 60, 1),
            "skipped_minutes": round(skipped / 60, 1)}


def times_table(t):
    lines = ["| stages | runs | minutes (each stage's own time) |", "|---|---:|---:|"]
    for row in t["groups"]:
        lines.append(f"| {row['stages']} | {row['count']} | {row['minutes']:.1f} |")
    lines.append(f"| **the script, wall-clock**, {t['jobs']} parallel lanes | | **{t['wall_minutes']:.1f}** |")
    if t["skipped_minutes"]:
        lines.append(f"| stages it found done (made before, e.g. by another experiment); from scratch add at most | | "
                     f"{t['skipped_minutes']:.1f} |")
    return "\n".join(lines)
