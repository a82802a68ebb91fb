#!/usr/bin/env python3
"""Renders dialogs with the chat template of an exported model directory, as users do.

    check_chat_template.py MODEL_DIR DIALOGS_JSON

DIALOGS_JSON holds a list of dialogs, each a list of {"role", "content"} messages. Loads the
tokenizer with AutoTokenizer (tokenizer.json + tokenizer_config.json) and prints one JSON line:
{"ids": [[...] per dialog], "invalid_refused": [...], "tokenizer_class": ..., "transformers":
version}. The Rust test compares the ids with our own chat encoding. `invalid_refused` says, for
each of a few dialogs the Llama 2 format cannot hold (two user turns in a row, a second system
message, only a system message), whether the template raised.
"""

import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    with open(sys.argv[2]) as f:
        dialogs = json.load(f)
    ids = []
    for dialog in dialogs:
        out = tokenizer.apply_chat_template(dialog, tokenize=True)
        # 5.x returns a BatchEncoding, 4.57 a list.
        if not isinstance(out, list):
            out = out["input_ids"]
        ids.append([int(i) for i in out])
    invalid = [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
         {"role": "system", "content": "c"}],
        [{"role": "system", "content": "a"}],
    ]
    refused = []
    for dialog in invalid:
        try:
            tokenizer.apply_chat_template(dialog, tokenize=False)
            refused.append(False)
        except Exception:  # jinja's TemplateError, raised by raise_exception
            refused.append(True)
    print(json.dumps({
        "ids": ids,
        "invalid_refused": refused,
        "tokenizer_class": type(tokenizer).__name__,
        "transformers": transformers.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
