#!/usr/bin/env python3
"""Make small random Llama checkpoints and reference outputs for the Rust tests.

For each model this writes tests/fixtures/golden/<name>/:
  config.json, generation_config.json, model.safetensors (or shards + index)
      -- LlamaForCausalLM.save_pretrained(..., safe_serialization=True)
  tokenizer.json     -- copy of tests/fixtures/tokenizer/tokenizer.json (build_tokenizer.py)
  golden.json        -- {"sequences": [[ids]...], "greedy": [{"prompt_ids", "new_tokens", ...}],
                         "max_new_tokens": 16, ...}
  golden.safetensors -- float32 logits_0, logits_1, logits_2, each [len_i, vocab]: the full
                         logits of sequences[i] run alone (batch 1, no padding)

Models:
  tiny-gqa               vocab 512, hidden 64, 2 layers, 4 heads / 2 KV heads, MLP 176, tied, f32
  tiny-odd               vocab 512, hidden 60, 3 layers, 5 heads / 1 KV head (head_dim 12), MLP 97,
                         untied, eps 1e-6, rope_theta 50000, f32
  tiny-rope-linear       vocab 512, hidden 32, 2 layers, 4 heads / 2 KV heads, MLP 64, tied, RoPE scaling
                         linear with factor 4
  tiny-rope-dynamic      the same shape with dynamic (NTK) RoPE scaling, factor 2, and
                         max_position_embeddings 8, so most references run past it; the rotary
                         state transformers keeps between calls is reset before each call
  tiny-gqa-bf16-sharded  tiny-gqa's weights saved as bfloat16 in >= 2 shards with an index; its
                         references are computed from the bf16 weights upcast to float32, as a
                         loader converting bf16 -> f32 sees them

The fixtures are made with both pinned transformers versions, whose config.json layouts differ
(5.x writes `rope_parameters` and `dtype` where 4.x writes `rope_theta` and `torch_dtype`):
  transformers 4.57.1 (.venv)                      -> tests/fixtures/golden/
  transformers 5.24.0 (PYTHONPATH=.venv/transformers5, scripts/requirements-golden-5.txt)
                                                   -> tests/fixtures/golden-tf5/
Any other version is refused, so the committed files always come from a pinned one.

Everything runs on CPU in float32 with eager attention, one thread and fixed seeds, so reruns
give identical files. Greedy references are robust: at every generated step the gap between the
top-1 and top-2 logit must exceed MIN_GAP, both in generate() (KV cache) and in one full forward
pass over prompt + generated tokens (no cache); otherwise the prompt is redrawn from the next seed.

Run:  .venv/bin/python scripts/make_golden.py [--only NAME ...]
      PYTHONPATH=.venv/transformers5 .venv/bin/python scripts/make_golden.py [--only NAME ...]
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# transformers version -> where its fixtures go
PINNED = {
    "4.57.1": REPO / "tests/fixtures/golden",
    "5.24.0": REPO / "tests/fixtures/golden-tf5",
}
MAJOR = int(transformers.__version__.split(".")[0])
BOS, EOS, PAD = 1, 2, 0
FIRST_RANDOM_ID = 3  # random ids are drawn from [3, vocab)
SEQUENCE_LENGTHS = [7, 12, 5]
PROMPT_LENGTHS = [4, 9, 6]
MAX_NEW_TOKENS = 16
MIN_GAP = 1e-2  # required top-1 minus top-2 logit gap at every greedy step (brief asks > 1e-3)
MAX_TRIES = 200
INIT_STD = 0.35  # weights ~ N(0, INIT_STD); RMSNorm weights ~ U(0.6, 1.4)
SHARD_SIZE = "100KB"

MODELS = {
    "tiny-gqa": dict(
        config=dict(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=176, tie_word_embeddings=True,
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        ),
        seed=1000,
    ),
    "tiny-odd": dict(
        config=dict(
            vocab_size=512, hidden_size=60, num_hidden_layers=3, num_attention_heads=5,
            num_key_value_heads=1, intermediate_size=97, tie_word_embeddings=False,
            max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=50000.0,
        ),
        seed=2000,
    ),
    "tiny-rope-linear": dict(
        config=dict(
            vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        ),
        rope=dict(type="linear", factor=4.0),
        seed=3000,
    ),
    "tiny-rope-dynamic": dict(
        config=dict(
            vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
            max_position_embeddings=8, rms_norm_eps=1e-5, rope_theta=10000.0,
        ),
        rope=dict(type="dynamic", factor=2.0),
        seed=4000,
    ),
}
BF16_NAME = "tiny-gqa-bf16-sharded"
BF16_SOURCE = "tiny-gqa"


def make_config(spec: dict, rope: dict | None = None) -> LlamaConfig:
    spec = dict(spec)
    if MAJOR >= 5:
        # 5.x takes RoPE settings as `rope_parameters` and the dtype as `dtype`.
        params = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
        if rope:
            params.update(rope_type=rope["type"], factor=rope["factor"])
        version_args = dict(rope_parameters=params, dtype="float32")
    else:
        # 4.x: theta at the top level, the scaling as {"type", "factor"}.
        scaling = {"type": rope["type"], "factor": rope["factor"]} if rope else None
        version_args = dict(rope_scaling=scaling, torch_dtype="float32")
    cfg = LlamaConfig(
        **spec,
        **version_args,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=None,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=INIT_STD,
    )
    cfg._attn_implementation = "eager"
    return cfg


def load_f32(path: Path) -> LlamaForCausalLM:
    dtype_arg = "dtype" if MAJOR >= 5 else "torch_dtype"
    return LlamaForCausalLM.from_pretrained(
        path, **{dtype_arg: torch.float32}, attn_implementation="eager"
    ).eval()


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Our own init, independent of transformers' _init_weights: N(0, INIT_STD) for every matrix,
    U(0.6, 1.4) for RMSNorm weights, so logits are peaked and norm weights matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)


def random_ids(g: torch.Generator, length: int, vocab: int) -> list:
    rest = torch.randint(FIRST_RANDOM_ID, vocab, (length - 1,), generator=g).tolist()
    return [BOS] + rest


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., vocab] -> top-1 minus top-2 value [...]."""
    t = torch.topk(logits, 2, dim=-1).values
    return t[..., 0] - t[..., 1]


def reset_rope(model: LlamaForCausalLM) -> None:
    """Dynamic RoPE in transformers keeps the largest length seen until a call is shorter than
    max_position_embeddings; every reference here is one call on its own, as in our model."""
    rotary = model.model.rotary_emb
    if hasattr(rotary, "original_inv_freq"):
        rotary.register_buffer("inv_freq", rotary.original_inv_freq.clone(), persistent=False)
        rotary.max_seq_len_cached = rotary.original_max_seq_len


@torch.no_grad()
def full_logits(model: LlamaForCausalLM, ids: list) -> torch.Tensor:
    reset_rope(model)
    x = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def greedy(model: LlamaForCausalLM, prompt: list):
    """Returns (new_tokens, min_gap) or (None, min_gap) if some step is too close to call."""
    reset_rope(model)
    x = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        num_beams=1,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[0, len(prompt):].tolist()
    step_logits = torch.stack([l[0] for l in out.logits])  # [steps, vocab], raw (unprocessed)
    assert step_logits.shape[0] == len(new)
    # generate() must have picked the argmax of the raw logits at every step.
    assert step_logits.argmax(-1).tolist() == new, "generate() did not follow the raw argmax"
    gaps = [top2_gap(step_logits).min().item()]
    # The same path without KV cache: one forward over prompt + new tokens.
    full = full_logits(model, prompt + new)[len(prompt) - 1: len(prompt) - 1 + len(new)]
    if full.argmax(-1).tolist() != new:
        return None, 0.0
    gaps.append(top2_gap(full).min().item())
    # Stopped early only on EOS.
    assert len(new) == MAX_NEW_TOKENS or new[-1] == EOS
    assert EOS not in new[:-1]
    g = min(gaps)
    return (new if g > MIN_GAP else None), g


def make_references(model: LlamaForCausalLM, vocab: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    sequences = [random_ids(g, n, vocab) for n in SEQUENCE_LENGTHS]
    logits = {f"logits_{i}": full_logits(model, s).contiguous() for i, s in enumerate(sequences)}
    greedy_cases, tries = [], 0
    for n in PROMPT_LENGTHS:
        for attempt in range(MAX_TRIES):
            tries += 1
            # Deterministic redraw: prompt k, attempt a uses its own seed.
            pg = torch.Generator().manual_seed(seed * 1000 + 17 * n + attempt)
            prompt = random_ids(pg, n, vocab)
            new, gap = greedy(model, prompt)
            if new is not None:
                greedy_cases.append({"prompt_ids": prompt, "new_tokens": new, "min_top2_gap": round(gap, 6)})
                break
        else:
            sys.exit(f"no robust greedy prompt of length {n} in {MAX_TRIES} tries")
    return sequences, logits, greedy_cases, tries


def dump_json(obj) -> str:
    """Indented JSON, but each list of numbers on one line (readable diffs, small files)."""
    def enc(o, ind):
        pad, pad1 = " " * ind, " " * (ind + 1)
        if isinstance(o, dict):
            items = [f"{pad1}{json.dumps(k)}: {enc(v, ind + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list) and o and not all(isinstance(x, (int, float)) for x in o):
            return "[\n" + ",\n".join(pad1 + enc(x, ind + 1) for x in o) + "\n" + pad + "]"
        return json.dumps(o)
    return enc(obj, 0) + "\n"


def write_refs(out_dir: Path, name: str, model: LlamaForCausalLM, seed: int, tokenizer: Path, note: str) -> dict:
    vocab = model.config.vocab_size
    sequences, logits, greedy_cases, tries = make_references(model, vocab, seed)
    for i, s in enumerate(sequences):
        assert logits[f"logits_{i}"].shape == (len(s), vocab) and logits[f"logits_{i}"].dtype == torch.float32
    save_file(logits, str(out_dir / "golden.safetensors"), metadata={"format": "pt"})
    golden = {
        "model": name,
        "note": note,
        "sequences": sequences,
        "greedy": greedy_cases,
        "max_new_tokens": MAX_NEW_TOKENS,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "min_gap_required": MIN_GAP,
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
    }
    (out_dir / "golden.json").write_text(dump_json(golden))
    shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    return {
        "name": name,
        "files": sorted(p.name for p in out_dir.iterdir()),
        "bytes": sum(p.stat().st_size for p in out_dir.iterdir()),
        "greedy": [(len(c["prompt_ids"]), len(c["new_tokens"]), c["min_top2_gap"]) for c in greedy_cases],
        "tries": tries,
        "logit_std": round(torch.cat(list(logits.values())).std().item(), 3),
        "max_softmax_mean": round(torch.cat(list(logits.values())).softmax(-1).max(-1).values.mean().item(), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    version = transformers.__version__
    if version not in PINNED:
        sys.exit(f"transformers {version} is not a pinned version ({', '.join(PINNED)})")
    ap.add_argument("--out-dir", type=Path, default=PINNED[version])
    ap.add_argument("--tokenizer", type=Path, default=REPO / "tests/fixtures/tokenizer/tokenizer.json")
    ap.add_argument("--only", nargs="*", help="make only these models (default: all)")
    args = ap.parse_args()
    if not args.tokenizer.is_file():
        sys.exit(f"{args.tokenizer} missing: run scripts/build_tokenizer.py first")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    summaries = []

    for name, spec in MODELS.items():
        if args.only and name not in args.only:
            continue
        out_dir = args.out_dir / name
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(make_config(spec["config"], spec.get("rope"))).float().eval()
        init_weights(model, spec["seed"])
        model.save_pretrained(out_dir, safe_serialization=True)
        assert (out_dir / "model.safetensors").is_file()
        # References come from the saved files, exactly as a loader sees them.
        model = load_f32(out_dir)
        summaries.append(write_refs(out_dir, name, model, spec["seed"] + 1, args.tokenizer,
                                    "float32 weights; logits and greedy computed in float32 on CPU"))

        if name == BF16_SOURCE:
            bf_dir = args.out_dir / BF16_NAME
            if bf_dir.exists():
                shutil.rmtree(bf_dir)
            bf_dir.mkdir(parents=True)
            src = model.state_dict()
            model.to(torch.bfloat16).save_pretrained(bf_dir, safe_serialization=True, max_shard_size=SHARD_SIZE)
            shards = sorted(bf_dir.glob("model-*-of-*.safetensors"))
            assert len(shards) >= 2 and (bf_dir / "model.safetensors.index.json").is_file(), shards
            assert not (bf_dir / "model.safetensors").exists()
            # Load the bf16 checkpoint upcast to float32 and check it is tiny-gqa rounded to bf16.
            bf = load_f32(bf_dir)
            for k, v in bf.state_dict().items():
                assert v.dtype == torch.float32
                assert torch.equal(v, src[k].to(torch.bfloat16).float()), k
            summaries.append(write_refs(bf_dir, BF16_NAME, bf, spec["seed"] + 1, args.tokenizer,
                                        "bfloat16 weights in shards; logits and greedy computed with the "
                                        "bf16 weights upcast to float32, in float32 on CPU"))

    total = 0
    for s in summaries:
        total += s["bytes"]
        print(f"{s['name']}: {s['bytes'] / 1024:.0f} KiB, logit std {s['logit_std']}, "
              f"mean max-prob {s['max_softmax_mean']}, greedy (prompt len, new, min gap) {s['greedy']}, "
              f"prompt tries {s['tries']}")
        print(f"  files: {', '.join(s['files'])}")
    print(f"total {total / 1024:.0f} KiB under {args.out_dir}")
    h = hashlib.sha256()
    for p in sorted(args.out_dir.rglob("*")):
        if args.only and p.relative_to(args.out_dir).parts[0] not in args.only:
            continue
        if p.is_file():
            h.update(p.relative_to(args.out_dir).as_posix().encode() + b"\0" + p.read_bytes())
    print(f"fixture digest {h.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
