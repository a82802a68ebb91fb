#!/usr/bin/env python3
"""Greedy generation throughput of Hugging Face LlamaForCausalLM on CPU, as a baseline for the Rust
generator. The model is random (no download) with the stories15M shape: dim 288, 6 layers, 6 heads,
6 KV heads, MLP 768, vocab 32000, 512 positions, untied head (24.4M parameters), float32.

For use_cache=True and use_cache=False it times generate() (greedy, all --new-tokens forced with
min_new_tokens = max_new_tokens) on a random prompt of --prompt-len tokens, batch --batch, after a
warm-up, and prints one JSON line per mode:
  {"use_cache": true, "tokens_per_sec": ..., ...}
tokens_per_sec = batch * new_tokens / wall seconds of the generate() call (prompt prefill included),
the median of --repeats runs.

Run:  .venv/bin/python scripts/bench_generate_hf.py --threads 2 --batch 1 --new-tokens 128
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    ap.add_argument("--modes", default="cache,nocache", help="comma list of: cache, nocache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tied", action="store_true", help="tie the LM head (configs/tiny-15m.toml)")
    ap.add_argument("--sample", action="store_true",
                    help="sample at temperature 1 over the whole vocabulary (as PPO rollouts) instead of greedy")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=288, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=6, intermediate_size=768, max_position_embeddings=512,
        tie_word_embeddings=args.tied, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = args.attn
    model = LlamaForCausalLM(cfg).float().eval()
    n_params = sum(p.numel() for p in model.parameters())
    if args.prompt_len + args.new_tokens > cfg.max_position_embeddings:
        raise SystemExit("prompt + new tokens exceed the 512 positions")

    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    prompt[:, 0] = 1  # BOS
    mask = torch.ones_like(prompt)

    def run(use_cache: bool, new_tokens: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompt, attention_mask=mask, do_sample=args.sample, num_beams=1,
                temperature=1.0, top_p=1.0, top_k=0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                eos_token_id=2, pad_token_id=0, use_cache=use_cache,
            )
        dt = time.perf_counter() - t0
        assert out.shape == (args.batch, args.prompt_len + new_tokens), out.shape
        return dt

    for mode in args.modes.split(","):
        use_cache = {"cache": True, "nocache": False}[mode.strip()]
        run(use_cache, min(8, args.new_tokens))  # warm-up
        times = [run(use_cache, args.new_tokens) for _ in range(args.repeats)]
        dt = statistics.median(times)
        print(json.dumps({
            "use_cache": use_cache,
            "tokens_per_sec": round(args.batch * args.new_tokens / dt, 2),
            "seconds": round(dt, 4),
            "runs_seconds": [round(t, 4) for t in times],
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "attn": args.attn,
            "tied": args.tied,
            "sample": args.sample,
            "params": n_params,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
