#!/usr/bin/env python3
"""The PyTorch peer of scripts/gpu-check.sh: the same shapes and settings as its `train bench`
runs, in PyTorch eager on the same GPU, so each of our GPU figures stands beside PyTorch's
measured in the same session.

  python scripts/gpu_peer_torch.py [--json] [--dry-run]

- SFT: Llama-2-7B shape with random weights, bf16 base, LoRA rank 16 (alpha 32) on q/k/v/o,
  activation checkpointing, 2 x 4096 tokens per step in micro-batches of 1
  (recipes/bench-gpu-sft-7b-lora.toml); the same in full bf16 fine-tuning with AdamW on bf16
  parameters where it fits (bench-gpu-sft-7b-full.toml); the ~1B shape (TinyLlama-1.1B) in full
  bf16, 8 x 2048 tokens in micro-batches of 4, no checkpointing (bench-gpu-sft-1b.toml).
- Generation: the ~1B shape in bf16, 16-token prompts, 128 new tokens, greedy with the KV cache,
  batch 1 and 64 (transformers' generate).
Uses transformers' LlamaForCausalLM (SDPA attention) and peft where installed; without
transformers, a plain PyTorch Llama of the same shapes (SDPA attention), and no generation.
Model FLOPs per token follow PaLM's accounting, as `train bench sft` reports them. Prints one
JSON object (--json) or a summary. `--dry-run` uses tiny shapes on CPU (to test the script).
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

SHAPES = {
    # configs/llama2-7b.toml, configs/tinyllama-1.1b.toml, configs/tiny-test.toml
    "7b": dict(vocab=32000, dim=4096, ffn=11008, layers=32, heads=32, kv_heads=32),
    "1b": dict(vocab=32000, dim=2048, ffn=5632, layers=22, heads=32, kv_heads=4),
    "tiny": dict(vocab=512, dim=64, ffn=176, layers=2, heads=4, kv_heads=2),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    try:
        import transformers  # noqa: F401

        implementation = f"transformers {transformers.__version__}"
    except ImportError:
        implementation = "plain PyTorch"
    report = {
        "torch": torch.__version__,
        "implementation": implementation,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "sft": [],
        "generate": [],
    }
    big, small = ("tiny", "tiny") if args.dry_run else ("7b", "1b")
    seq7, seq1 = (64, 64) if args.dry_run else (4096, 2048)
    runs = [
        dict(name="7b_lora", shape=big, batch=2, micro=1, seq=seq7, lora=16, checkpointing=True),
        dict(name="7b_full", shape=big, batch=2, micro=1, seq=seq7, lora=0, checkpointing=True),
        dict(name="1b_full", shape=small, batch=8, micro=4, seq=seq1, lora=0, checkpointing=False),
    ]
    for run in runs:
        try:
            report["sft"].append(bench_sft(device, steps=1 if args.dry_run else 3, **run))
        except torch.OutOfMemoryError:
            report["sft"].append({"name": run["name"], "skipped": "out of GPU memory"})
        free(device)
    if implementation != "plain PyTorch":
        for batch in [1, 64]:
            new = 8 if args.dry_run else 128
            report["generate"].append(bench_generate(device, small, batch, new))
            free(device)
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=1))


def free(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def flops_per_token(shape, seq, weight_gradients):
    s = SHAPES[shape]
    head_dim = s["dim"] // s["heads"]
    per_layer = (
        s["dim"] * s["dim"] * 2  # q, o
        + 2 * s["dim"] * s["kv_heads"] * head_dim  # k, v
        + 3 * s["dim"] * s["ffn"]
    )
    matmul_weights = s["layers"] * per_layer + s["vocab"] * s["dim"]
    return (6 if weight_gradients else 4) * matmul_weights + 12 * s["layers"] * s["dim"] * seq


def build(shape, device, lora, checkpointing):
    s = SHAPES[shape]
    torch.manual_seed(0)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        LlamaForCausalLM = None
    with torch.device(device):
        if LlamaForCausalLM is not None:
            config = LlamaConfig(
                vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["ffn"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                attn_implementation="sdpa",
            )
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(torch.float32)
            if checkpointing:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
                model.config.use_cache = False
            logits_of = lambda ids: model(input_ids=ids).logits  # noqa: E731
        else:
            model = PlainLlama(s, checkpointing).to(torch.bfloat16)
            logits_of = model
    if lora:
        model = with_lora(model, lora)
    return model, logits_of


def with_lora(model, rank):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        get_peft_model = None
    if get_peft_model is not None and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in list(model.named_modules()):
            for target in targets:
                child = getattr(module, target, None)
                if isinstance(child, torch.nn.Linear):
                    setattr(module, target, LoraLinear(child, rank))
        return model


class LoraLinear(torch.nn.Module):
    """A frozen linear layer plus a trained rank-`rank` update, f32 factors (as peft keeps)."""

    def __init__(self, base, rank):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(
            torch.empty(rank, base.in_features, device=base.weight.device).uniform_(
                -1 / math.sqrt(base.in_features), 1 / math.sqrt(base.in_features)
            )
        )
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = 2.0

    def forward(self, x):
        update = (x.float() @ self.a.t() @ self.b.t()) * self.scale
        return self.base(x) + update.to(x.dtype)


class PlainLlama(torch.nn.Module):
    """Llama 2 in plain PyTorch: RMSNorm, rotary embeddings, grouped-query SDPA attention,
    SwiGLU; for machines without transformers."""

    def __init__(self, s, checkpointing):
        super().__init__()
        self.s, self.checkpointing = s, checkpointing
        self.embed = torch.nn.Embedding(s["vocab"], s["dim"])
        self.layers = torch.nn.ModuleList([Block(s) for _ in range(s["layers"])])
        self.norm = torch.nn.RMSNorm(s["dim"], eps=1e-5)
        self.lm_head = torch.nn.Linear(s["dim"], s["vocab"], bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        head_dim = self.s["dim"] // self.s["heads"]
        pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=ids.device) / head_dim))
        angles = torch.outer(pos, inv)
        rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        for layer in self.layers:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, use_reentrant=False)
            else:
                x = layer(x, rope)
        return self.lm_head(self.norm(x))


class Block(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        d, hd = s["dim"], s["dim"] // s["heads"]
        self.heads, self.kv_heads, self.hd = s["heads"], s["kv_heads"], hd
        self.input_norm = torch.nn.RMSNorm(d, eps=1e-5)
        self.q_proj = torch.nn.Linear(d, s["heads"] * hd, bias=False)
        self.k_proj = torch.nn.Linear(d, s["kv_heads"] * hd, bias=False)
        self.v_proj = torch.nn.Linear(d, s["kv_heads"] * hd, bias=False)
        self.o_proj = torch.nn.Linear(s["heads"] * hd, d, bias=False)
        self.post_norm = torch.nn.RMSNorm(d, eps=1e-5)
        self.gate = torch.nn.Linear(d, s["ffn"], bias=False)
        self.up = torch.nn.Linear(d, s["ffn"], bias=False)
        self.down = torch.nn.Linear(s["ffn"], d, bias=False)

    def forward(self, x, rope):
        b, t, _ = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rotate(q, rope), rotate(k, rope)
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads
        )
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rotate(x, rope):
    cos, sin = rope
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[: x.shape[2]], sin[: x.shape[2]]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def bench_sft(device, name, shape, batch, micro, seq, lora, checkpointing, steps):
    model, logits_of = build(shape, device, lora, checkpointing)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.1)
    vocab = SHAPES[shape]["vocab"]
    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        torch.randint(3, vocab, (micro, seq), generator=generator).to(device)
        for _ in range(batch // micro)
    ]

    def step():
        for ids in batches:
            logits = logits_of(ids)
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1)
            ) / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    rate = steps * batch * seq / seconds
    per_token = flops_per_token(shape, seq, weight_gradients=not lora)
    report = {
        "name": name, "batch_size": batch, "micro_batch_size": micro, "seq_len": seq,
        "lora_rank": lora, "activation_checkpointing": checkpointing, "dtype": "bf16",
        "tokens_per_sec": rate, "model_flops_per_token": per_token,
        "model_tflops_per_sec": per_token * rate / 1e12,
        "trained_parameters": sum(p.numel() for p in trained),
    }
    if device == "cuda":
        # Reserved by the caching allocator, the closer figure to what nvidia-smi shows of
        # ours (which also counts the CUDA context); allocated for reference.
        report["peak_gpu_memory_bytes"] = torch.cuda.max_memory_reserved()
        report["peak_gpu_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    del model, optimizer, batches
    return report


def bench_generate(device, shape, batch, new_tokens):
    model, _ = build(shape, device, lora=0, checkpointing=False)
    model.eval()
    vocab = SHAPES[shape]["vocab"]
    prompts = torch.randint(3, vocab, (batch, 16), generator=torch.Generator().manual_seed(0))
    prompts = prompts.to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  use_cache=True, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompts, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        sync(device)
        start = time.perf_counter()
        out = model.generate(prompts, **kwargs)
        sync(device)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - prompts.shape[1]) * batch
    return {"batch": batch, "prompt_len": 16, "new_tokens": new_tokens, "dtype": "bf16",
            "tokens_per_sec": tokens / seconds, "seconds": seconds}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
