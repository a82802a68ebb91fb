#!/usr/bin/env python3
"""Recompute what `train dpo` logged for one step with transformers and the published formulas.

Usage: check_dpo.py POLICY_DIR REFERENCE_DIR IDS_JSONL METRICS_JSONL --step N --beta B
       [--loss sigmoid|ipo|robust] [--label-smoothing E] [--tolerance 1e-4]

POLICY_DIR is the model the step started from (the checkpoint of step N-1), REFERENCE_DIR the
reference model; both are loaded with transformers.LlamaForCausalLM in float32. IDS_JSONL is
`train data inspect --ids` of the run's data: the step must have covered every training pair
(batch_size = the number of pairs), so the logged means do not depend on the batch order.

For each pair the log-probabilities of the answer tokens (the trained mask) are summed (for IPO:
averaged) and the losses are those of the papers, as TRL writes them:
  sigmoid: -(1-e) log s(b h) - e log s(-b h)               (DPO; cDPO with e > 0)
  robust:  (-(1-e) log s(b h) + e log s(-b h)) / (1 - 2e)   (Chowdhury et al., 2024)
  ipo:     (h - 1/(2b))^2                                   (Azar et al., 2023)
with h = (pi_c - ref_c) - (pi_r - ref_r). Rewards are b (pi - ref). Prints one JSON line with
both sets of values and the largest relative difference; exit 1 past --tolerance.
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaForCausalLM


def sequence_logps(model, rows):
    """Summed log-probabilities of each row's trained tokens, and their counts."""
    sums, counts = [], []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["ids"]])
            logits = model(ids).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(row["trained"][1:], dtype=torch.bool)
            sums.append(logp[mask].double().sum().item())
            counts.append(int(mask.sum()))
    return sums, counts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("policy")
    parser.add_argument("reference")
    parser.add_argument("ids")
    parser.add_argument("metrics")
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "robust"])
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    pairs = [json.loads(l) for l in open(args.ids) if l.strip()]
    pairs = [p for p in pairs if p["kind"] == "pair" and p["split"] == "train"]
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    load = lambda d: LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    pi, counts = sequence_logps(load(args.policy), rows)
    ref, _ = sequence_logps(load(args.reference), rows)
    if args.loss == "ipo":
        pi = [s / c for s, c in zip(pi, counts)]
        ref = [s / c for s, c in zip(ref, counts)]
    n = len(pairs)
    pi = torch.tensor(pi, dtype=torch.float64)
    ref = torch.tensor(ref, dtype=torch.float64)
    b, e = args.beta, args.label_smoothing
    chosen = b * (pi[:n] - ref[:n])
    rejected = b * (pi[n:] - ref[n:])
    h = (pi[:n] - ref[:n]) - (pi[n:] - ref[n:])
    if args.loss == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(b * h) - e * F.logsigmoid(-b * h)
    elif args.loss == "robust":
        losses = (-(1 - e) * F.logsigmoid(b * h) + e * F.logsigmoid(-b * h)) / (1 - 2 * e)
    else:
        losses = (h - 1 / (2 * b)) ** 2
    expected = {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).double().mean().item(),
        "logps/chosen": pi[:n].mean().item(),
        "logps/rejected": pi[n:].mean().item(),
    }
    logged = [json.loads(l) for l in open(args.metrics) if l.strip()]
    logged = [m for m in logged if m.get("step") == args.step and "rewards/chosen" in m][0]
    diff = max(abs(logged[k] - v) / max(1.0, abs(v)) for k, v in expected.items())
    print(json.dumps({
        "max_rel_diff": diff,
        "pairs": n,
        "expected": expected,
        "logged": {k: logged[k] for k in expected},
        "transformers": transformers.__version__,
    }))
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
