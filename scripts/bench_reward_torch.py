#!/usr/bin/env python3
"""PyTorch + transformers baseline for `train bench reward`: LlamaForSequenceClassification on the
stories15M shape, `--pairs` pairs (2 x pairs sequences) of `--seq-len` tokens. Measures full
training steps (forward of chosen and rejected in one batch, -log sigmoid(r_c - r_r), backward,
global-norm clipping, AdamW) and scoring without gradients.

Usage: .venv/bin/python scripts/bench_reward_torch.py [--threads 2] [--pairs 8] [--seq-len 256] [--steps 5]
Prints one JSON line with train_pairs_per_sec and score_pairs_per_sec.
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # configs/tiny-15m.toml with a scalar head
    config = LlamaConfig(
        vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, num_labels=1, pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    ids = torch.randint(3, config.vocab_size, (2 * args.pairs, args.seq_len))
    n = args.pairs
    train_time = 0.0
    for step in range(args.steps + 1):
        start = time.perf_counter()
        scores = model(input_ids=ids).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(scores[:n] - scores[n:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:
            train_time += time.perf_counter() - start
    model.eval()
    score_time = 0.0
    with torch.no_grad():
        for step in range(args.steps + 1):
            start = time.perf_counter()
            model(input_ids=ids).logits
            if step > 0:
                score_time += time.perf_counter() - start
    print(json.dumps({
        "framework": f"torch {torch.__version__}",
        "pairs": args.pairs, "seq_len": args.seq_len, "steps": args.steps,
        "threads": args.threads,
        "train_pairs_per_sec": args.steps * args.pairs / train_time,
        "score_pairs_per_sec": args.steps * args.pairs / score_time,
    }))


if __name__ == "__main__":
    main()
