#!/usr/bin/env python3
"""PyTorch + transformers baseline for `train bench sft`: the same model shape, batch and sequence
length, full training steps (forward, cross-entropy, backward, global-norm clipping, AdamW).

Usage: .venv/bin/python scripts/bench_sft_torch.py [--threads 2] [--batch 8] [--seq-len 256]
           [--steps 5] [--shape 15m|110m] [--checkpointing] [--dtype f32|bf16|bf16-mixed]
           [--lora RANK]
Prints one JSON line with tokens_per_sec and the process's peak RSS. `--shape 110m` is
configs/tiny-110m.toml; `--checkpointing` turns on transformers' per-layer gradient
checkpointing (the counterpart of train.activation_checkpointing). `--dtype bf16` trains a bf16
model with AdamW on bf16 parameters (runtime.dtype = "bf16"); `bf16-mixed` keeps f32 parameters
under torch.autocast(bfloat16) (runtime.dtype = "bf16-mixed"). `--lora RANK` trains peft LoRA
adapters (alpha 2 * rank) on q_proj and v_proj of a frozen base ([lora] rank = RANK).
"""

import argparse
import json
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--shape", choices=["15m", "110m"], default="15m")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--dtype", choices=["f32", "bf16", "bf16-mixed"], default="f32")
    parser.add_argument("--lora", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.shape == "15m":
        # configs/tiny-15m-untied.toml
        config = LlamaConfig(
            vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6,
            num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        )
    else:
        # configs/tiny-110m.toml
        config = LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        )
    model = LlamaForCausalLM(config).train()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, lora)
        if args.checkpointing:
            model.enable_input_require_grads()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if "norm" not in n]
    no_decay = [p for n, p in trained if "norm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
    )
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq_len))
    timed = 0.0
    for step in range(args.steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16-mixed"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:
            timed += time.perf_counter() - start
    print(json.dumps({
        "framework": f"torch {torch.__version__}",
        "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
        "threads": args.threads, "shape": args.shape, "checkpointing": args.checkpointing,
        "dtype": args.dtype, "lora": args.lora,
        "tokens_per_sec": args.steps * args.batch * args.seq_len / timed,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
