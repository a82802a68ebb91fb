#!/usr/bin/env python3
"""Recompute what `train ppo` logged for one GRPO or RLOO iteration with transformers and the
published formulas.

Usage: check_grpo.py POLICY_DIR REFERENCE_DIR REWARD_DIR SAMPLES_JSONL METRICS_JSONL
       --iteration N --group G --beta B [--estimator grpo|rloo] [--kl-penalty loss|reward]
       [--temperature T] [--tolerance 1e-4]

POLICY_DIR is the policy the iteration sampled from (the checkpoint of iteration N-1),
REFERENCE_DIR the reference (the starting model), REWARD_DIR the reward model (read as
LlamaForSequenceClassification). SAMPLES_JSONL must hold every rollout of iteration N (ppo.samples
>= rollouts, sample_every = 1) with their token ids; the run must use one reward model, no
normalisation, whitening, clipping or EOS penalty, one PPO epoch and one mini-batch, so that the
logged policy loss is that of the first gradient step, where the probability ratio is 1.

  rewards  r_i: the reward model's score of prompt + answer (at the last token)
  KL_i:    sum over the answer of log pi(t) - log ref(t), at temperature T over the vocabulary
  grpo:    A_i = (r_i - mean_g) / (std_g + 1e-4), std with Bessel's correction (torch.std)
  rloo:    A_i = r_i - mean of the other answers of the group
  with --kl-penalty reward, r_i - beta * KL_i in place of r_i
  loss:    -sum_t A_i / tokens (+ beta * sum_t k3_t / tokens with --kl-penalty loss), where
           k3 = exp(ref - pi) - (ref - pi) - 1
Prints one JSON line; exit 1 when a value differs by more than --tolerance (relative, floor 1).
"""

import argparse
import json
import sys

import torch
import transformers
from transformers import LlamaForCausalLM, LlamaForSequenceClassification


def answer_logps(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt) - 1
    positions = torch.arange(start, start + len(response))
    return logp[positions, torch.tensor(response)].double()


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ["policy", "reference", "reward", "samples", "metrics"]:
        parser.add_argument(name)
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--estimator", default="grpo", choices=["grpo", "rloo"])
    parser.add_argument("--kl-penalty", default="loss", choices=["loss", "reward"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    samples = [json.loads(l) for l in open(args.samples) if l.strip()]
    samples = [s for s in samples if s["iteration"] == args.iteration]
    load = lambda d: LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    policy, reference = load(args.policy), load(args.reference)
    rm = LlamaForSequenceClassification.from_pretrained(args.reward, dtype=torch.float32).eval()

    rewards, kls, pis, refs = [], [], [], []
    for s in samples:
        prompt, response = s["prompt_ids"], s["response_ids"]
        with torch.no_grad():
            rewards.append(rm(torch.tensor([prompt + response])).logits[0, 0].double().item())
        pi = answer_logps(policy, prompt, response, args.temperature)
        ref = answer_logps(reference, prompt, response, args.temperature)
        pis.append(pi)
        refs.append(ref)
        kls.append((pi - ref).sum().item())
    r = torch.tensor(rewards, dtype=torch.float64)
    if args.kl_penalty == "reward":
        r = r - args.beta * torch.tensor(kls, dtype=torch.float64)
    groups = r.view(-1, args.group)
    if args.estimator == "grpo":
        adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    else:
        others = (groups.sum(1, keepdim=True) - groups) / (args.group - 1)
        adv = groups - others
    adv = adv.flatten()
    tokens = sum(len(p) for p in pis)
    loss = -sum(a * len(p) for a, p in zip(adv.tolist(), pis)) / tokens
    if args.kl_penalty == "loss":
        k3 = sum(((rf - p).exp() - (rf - p) - 1).sum().item() for p, rf in zip(pis, refs))
        loss += args.beta * k3 / tokens
    expected = {
        "reward_mean": sum(rewards) / len(rewards),
        "kl": sum(kls) / len(kls),
        "policy_loss": loss,
    }
    logged = [json.loads(l) for l in open(args.metrics) if l.strip()]
    logged = [m for m in logged if m.get("step") == args.iteration and "reward_mean" in m][0]
    diffs = {k: abs(logged[k] - v) / max(1.0, abs(v)) for k, v in expected.items()}
    adv_diff = max(abs(s["advantage"] - a) / max(1.0, abs(a)) for s, a in zip(samples, adv.tolist()))
    diffs["advantage"] = adv_diff
    print(json.dumps({
        "max_rel_diff": max(diffs.values()),
        "diffs": diffs,
        "rollouts": len(samples),
        "expected": expected,
        "logged": {k: logged[k] for k in expected},
        "transformers": transformers.__version__,
    }))
    return 0 if max(diffs.values()) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
