#!/usr/bin/env python3
"""Make fixtures in Meta's original Llama 2 layout for `train convert --meta` and
`train export --meta`, with transformers 4.57.1 references.

Writes tests/fixtures/meta/:
  tokenizer.model            SentencePiece BPE, vocab 512, byte fallback, Llama's settings, trained
                             on datasets/corpus/tiny-corpus.txt; beside the checkpoints, where
                             Meta's download puts it
  tokenizer_reference.json   texts and SentencePiece's ids for them (with BOS)
  tiny-mp1/                  params.json (vocab_size -1, as Meta's), consolidated.00.pth (float32)
  tiny-mp2/                  the same weights in bfloat16, split over 2 model-parallel ranks as
                             Meta's fairscale layers split them (consolidated.00.pth, .01.pth),
                             with `rope.freqs` as in Meta's files
  reference-mp1/, reference-mp2/
                             golden.json + golden.safetensors (make_golden.py's format): logits
                             and greedy continuations of the same weights loaded as a
                             LlamaForCausalLM in transformers (mp2: the bf16 weights upcast);
                             weights.safetensors: the Hugging Face state dict of those weights
                             (transformers' names and layout, in the checkpoint's dtype), which
                             a conversion must reproduce bit for bit

The model is random (GQA: 4 heads, 2 KV heads; dim 32, 2 layers, FFN 96 = multiple_of 16). Its
Meta-layout weights come from the Hugging Face ones by undoing the rotary permutation, and the
script proves the layout independently: Meta's forward pass (meta_reference.py, complex
rotations over interleaved pairs) on the Meta weights gives transformers' logits.

Needs sentencepiece (pip install sentencepiece==0.2.1) besides requirements-golden.txt.
Run:  .venv/bin/python scripts/make_meta_fixtures.py
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden  # noqa: E402
import meta_reference  # noqa: E402
from build_tokenizer import ROUND_TRIP_TEXTS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests/fixtures/meta"
SEED = 5000
PARAMS = {"dim": 32, "multiple_of": 16, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
          "norm_eps": 1e-05, "vocab_size": -1}
VOCAB = 512
FFN = 96


def train_tokenizer() -> spm.SentencePieceProcessor:
    prefix = OUT / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(REPO / "datasets/corpus/tiny-corpus.txt"), model_prefix=str(prefix),
        vocab_size=VOCAB, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2,
    )
    (OUT / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model")


def to_meta(hf: dict) -> dict:
    """Hugging Face state dict -> Meta's names, wq/wk rows back to interleaved pairs."""
    heads, kv_heads, dim = PARAMS["n_heads"], PARAMS["n_kv_heads"], PARAMS["dim"]

    def unpermute(w, n):
        rows = w.shape[0]
        return w.view(n, 2, rows // n // 2, dim).transpose(1, 2).reshape(rows, dim)

    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"],
           "norm.weight": hf["model.norm.weight"], "output.weight": hf["lm_head.weight"]}
    for i in range(PARAMS["n_layers"]):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        out[m + "attention.wq.weight"] = unpermute(hf[p + "self_attn.q_proj.weight"], heads)
        out[m + "attention.wk.weight"] = unpermute(hf[p + "self_attn.k_proj.weight"], kv_heads)
        out[m + "attention.wv.weight"] = hf[p + "self_attn.v_proj.weight"]
        out[m + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[m + "feed_forward.w1.weight"] = hf[p + "mlp.gate_proj.weight"]
        out[m + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
        out[m + "feed_forward.w3.weight"] = hf[p + "mlp.up_proj.weight"]
        out[m + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[m + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def split(state: dict, ranks: int) -> list:
    """Meta's model-parallel split: column-parallel by rows, row-parallel and the embedding by
    columns, norms whole. Each slice gets its own storage (torch.save saves whole storages)."""
    shards = [{} for _ in range(ranks)]
    for name, w in state.items():
        if w.dim() == 1:
            parts = [w] * ranks
        elif name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            parts = w.chunk(ranks, dim=1)
        else:
            parts = w.chunk(ranks, dim=0)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone().contiguous()
    return shards


def write_checkpoint(name: str, state: dict, ranks: int) -> Path:
    out = OUT / name
    out.mkdir(parents=True)
    (out / "params.json").write_text(json.dumps(PARAMS, indent=2) + "\n")
    head_dim = PARAMS["dim"] // PARAMS["n_heads"]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for rank, shard in enumerate(split(state, ranks)):
        if ranks > 1:
            shard["rope.freqs"] = freqs.to(next(iter(shard.values())).dtype)
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    return out


def main() -> None:
    if transformers.__version__ != "4.57.1":
        sys.exit(f"run with transformers 4.57.1 (.venv), not {transformers.__version__}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    sp = train_tokenizer()
    assert sp.get_piece_size() == VOCAB
    corpus = (REPO / "datasets/corpus/tiny-corpus.txt").read_text().splitlines()
    texts = [t for t in ROUND_TRIP_TEXTS if t] + corpus[:40] + ["  two  spaces", "tab\tand\nnewline", "ünïcödé 日本 🦙"]
    reference = [{"text": t, "ids": sp.encode(t, add_bos=True)} for t in texts]
    (OUT / "tokenizer_reference.json").write_text(make_golden.dump_json(reference))

    spec = dict(vocab_size=VOCAB, hidden_size=PARAMS["dim"], num_hidden_layers=PARAMS["n_layers"],
                num_attention_heads=PARAMS["n_heads"], num_key_value_heads=PARAMS["n_kv_heads"],
                intermediate_size=FFN, tie_word_embeddings=False, max_position_embeddings=4096,
                rms_norm_eps=PARAMS["norm_eps"], rope_theta=10000.0)
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(make_golden.make_config(spec)).float().eval()
    make_golden.init_weights(model, SEED)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = to_meta(hf)

    tokenizer_json = REPO / "tests/fixtures/tokenizer/tokenizer.json"
    for name, ranks, dtype in [("mp1", 1, torch.float32), ("mp2", 2, torch.bfloat16)]:
        weights = {k: v.to(dtype) for k, v in meta.items()}
        ckpt = write_checkpoint(f"tiny-{name}", weights, ranks)
        # The reference: the same weights (as the loader upcasts them) in transformers.
        model.load_state_dict({k: v.to(dtype).float() for k, v in hf.items()})
        ref = OUT / f"reference-{name}"
        ref.mkdir()
        summary = make_golden.write_refs(ref, f"meta-tiny-{name}", model, SEED + 1, tokenizer_json,
                                         f"Meta-layout fixture tests/fixtures/meta/tiny-{name} in "
                                         f"transformers; weights {dtype} upcast to float32")
        (ref / "tokenizer.json").unlink()
        save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()},
                  str(ref / "weights.safetensors"), metadata={"format": "pt"})
        # The layout itself, checked by Meta's own arithmetic on the files as written.
        shards = [torch.load(p, weights_only=True) for p in sorted(ckpt.glob("consolidated.*.pth"))]
        state = meta_reference.join_shards(shards)
        golden = json.loads((ref / "golden.json").read_text())
        worst = 0.0
        for i, ids in enumerate(golden["sequences"]):
            ours = meta_reference.forward(state, PARAMS, ids)
            theirs = make_golden.full_logits(model, ids)
            worst = max(worst, (ours - theirs).abs().max().item())
        assert worst < 1e-4, f"{name}: Meta's forward is {worst} from transformers"
        print(f"tiny-{name}: {ranks} rank(s), {dtype}, Meta forward vs transformers {worst:.2e}, "
              f"references {summary['bytes'] / 1024:.0f} KiB")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total {total / 1024:.0f} KiB under {OUT}")


if __name__ == "__main__":
    main()
