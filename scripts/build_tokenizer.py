#!/usr/bin/env python3
"""Train the repo's tiny byte-level BPE tokenizer (vocab 512) on datasets/corpus/tiny-corpus.txt.

Layout (what the Rust side relies on):
  * ids 0, 1, 2 are the special tokens <unk>, <s>, </s> (Llama's ids);
  * ids 3..258 are the 256 byte symbols of the ByteLevel alphabet, the rest are merges;
  * ByteLevel pre-tokenizer (add_prefix_space=False, GPT-2 split regex), ByteLevel decoder;
  * no normalizer and no post-processor: encode() adds no BOS/EOS, the caller adds them.

The output is deterministic: the same corpus gives a byte-identical tokenizer.json.
Also writes reference_ids.json (texts and their ids) next to it so other implementations
of the tokenizer can be checked against this one.

Run:  .venv/bin/python scripts/build_tokenizer.py
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

# Deterministic, and quiet about forked parallelism.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "Once upon a time, a little fox lived at the edge of the forest.",
    "Add 12 and 30. Answer: 12 + 30 = 42.",
    "  two leading spaces, a tab\there and a newline\nat the end\n",
    "Sofia ordered a café crème; naïve façade, déjà vu.",
    "日本語のテキスト 日本",
    "emoji: 🦙🎉👍🏽 done",
    "Mixed: Grüße, ça va? 12.5% — “quotes” and ‘apostrophes’",
    "",
]


def build(corpus: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer=trainer)
    return tok


def check(tok: Tokenizer, vocab_size: int) -> None:
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        sys.exit(f"vocab size is {got}, expected {vocab_size} (corpus too small for that many merges?)")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            sys.exit(f"{t} has id {tok.token_to_id(t)}, expected {i}")
    if tok.post_processor is not None:
        sys.exit("unexpected post-processor")
    for text in ROUND_TRIP_TEXTS:
        enc = tok.encode(text)
        if enc.ids and enc.ids[0] == 1:
            sys.exit("encode() added BOS; it must not")
        if 0 in enc.ids:
            sys.exit(f"<unk> produced for {text!r}")
        back = tok.decode(enc.ids, skip_special_tokens=False)
        if back != text:
            sys.exit(f"round trip failed: {text!r} -> {enc.ids} -> {back!r}")
    # Special tokens written literally in text are recognised as single tokens.
    ids = tok.encode("<s>Hi</s>").ids
    if ids[0] != 1 or ids[-1] != 2:
        sys.exit(f"special tokens in text not matched: {ids}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REPO / "datasets/corpus/tiny-corpus.txt")
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests/fixtures/tokenizer")
    ap.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args()

    tok = build(args.corpus, args.vocab_size)
    check(tok, args.vocab_size)

    # Determinism: a second training run must serialise to the same bytes.
    again = build(args.corpus, args.vocab_size)
    s1 = tok.to_str(pretty=True)
    if again.to_str(pretty=True) != s1:
        sys.exit("training is not deterministic")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "tokenizer.json"
    out.write_text(s1 + "\n", encoding="utf-8")

    # Reload from disk and re-check, as a consumer would.
    reloaded = Tokenizer.from_file(str(out))
    check(reloaded, args.vocab_size)

    ref = [
        {"text": t, "ids": reloaded.encode(t).ids}
        for t in ROUND_TRIP_TEXTS + ["<s>Hi</s>"]
    ]
    ref_path = args.out_dir / "reference_ids.json"
    ref_path.write_text(json.dumps({"add_special_tokens": False, "cases": ref}, ensure_ascii=False, indent=1) + "\n",
                        encoding="utf-8")

    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    sample = reloaded.encode("Hello, world! 日本 🦙")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out} "
          f"({out.stat().st_size} bytes, vocab {reloaded.get_vocab_size()}, sha256 {digest[:16]})")
    print(f"wrote {ref_path.relative_to(REPO) if ref_path.is_relative_to(REPO) else ref_path} ({len(ref)} cases)")
    print(f"example: {sample.tokens} -> {sample.ids}")
    print(f"round trip OK on {len(ROUND_TRIP_TEXTS)} texts (incl. é, 日本, emoji)")


if __name__ == "__main__":
    main()
