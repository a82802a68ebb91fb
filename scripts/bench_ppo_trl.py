#!/usr/bin/env python3
"""One PPO iteration of TRL 0.24.0's PPOTrainer on CPU, the peer of `train bench ppo --recipe
recipes/bench-ppo-15m.toml`, on the same shapes: random models of the stories15M shape with a tied
head (configs/tiny-15m.toml) for the policy and its reference, and LlamaForSequenceClassification
models of the same shape for the reward model and the separate value model; 64 random prompts of
32 tokens, 64 new tokens each sampled at temperature 1 over the whole vocabulary, stopping at EOS;
one PPO epoch in 4 mini-batches of 16, one optimizer step each; float32.

TRL generates and scores `local_rollout_forward_batch_size` rollouts at a time (64 here, TRL's
default, the whole batch, as ours generates). It runs one loss and one backward pass for policy
and value model together and one AdamW step (no gradient clipping in its loop; ours clips each
model at 1.0). TRL's config defaults (bf16 autocast, gradient checkpointing) are switched off:
both sides run float32 without checkpointing.

Prints one JSON line per timed iteration (after --warmup iterations):
  {"iteration": 1, "generation_s": ..., "scoring_s": ..., "update_s": ..., "total_s": ...}
generation: `batch_generation` (sampling with the KV cache, returning the logits);
scoring: from there to the first training forward pass (the log-probs from the generation logits,
the reference, value and reward model passes, the advantages); update: from there to the end of the
iteration (the mini-batch steps and the iteration's metrics).

Needs trl==0.24.0 and datasets (scripts/requirements-bench.txt) beside transformers 4.57.
Run:  .venv/bin/python scripts/bench_ppo_trl.py --threads 2 --steps 3
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from transformers.utils import logging as hf_logging  # noqa: E402
import trl  # noqa: E402
from trl import PPOConfig, PPOTrainer  # noqa: E402
from trl.trainer import ppo_trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    """Marks of one iteration: generation start/end, first training forward, iteration end."""

    def __init__(self) -> None:
        self.marks: dict = {}
        self.iterations: list = []

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--mini-batches", type=int, default=4)
    ap.add_argument("--forward-batch", type=int, default=64,
                    help="local_rollout_forward_batch_size: rollouts generated and scored at a time")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if trl.__version__ != "0.24.0":
        print(f"warning: measured with trl 0.24.0, this is {trl.__version__}", flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()

    def config() -> LlamaConfig:
        cfg = LlamaConfig(
            vocab_size=32000, hidden_size=288, num_hidden_layers=6, num_attention_heads=6,
            num_key_value_heads=6, intermediate_size=768, max_position_embeddings=512,
            tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=1,
        )
        cfg._attn_implementation = "sdpa"
        return cfg

    policy = LlamaForCausalLM(config()).float()
    reference = LlamaForCausalLM(config()).float()
    reference.load_state_dict(policy.state_dict())
    reward = LlamaForSequenceClassification(config()).float()
    value = LlamaForSequenceClassification(config()).float()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(ROOT, "tests/fixtures/tokenizer/tokenizer.json"),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
    )
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, 32000, (args.prompts, args.prompt_len), generator=generator)
    prompts[:, 0] = 1
    dataset = Dataset.from_dict({"input_ids": prompts.tolist()})

    iterations = args.warmup + args.steps
    out_dir = tempfile.mkdtemp(prefix="bench-ppo-trl-")
    settings = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.prompts,
        gradient_accumulation_steps=1,
        num_mini_batches=args.mini_batches,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=args.forward_batch,
        response_length=args.new_tokens,
        temperature=1.0,
        stop_token="eos",
        total_episodes=args.prompts * iterations,
        learning_rate=1e-6,
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        # TRL's config defaults are bf16 autocast and gradient checkpointing; ours runs f32
        # without checkpointing.
        bf16=False,
        gradient_checkpointing=False,
        seed=args.seed,
        disable_tqdm=True,
        logging_strategy="no",
    )

    clock = Clock()
    generate = ppo_trainer.batch_generation
    forward = ppo_trainer.forward

    def timed_generation(*a, **k):
        clock.mark("generation_start")
        result = generate(*a, **k)
        clock.mark("generation_end")
        return result

    def timed_forward(model, *a, **k):
        # The update's passes are the only ones with gradients.
        if torch.is_grad_enabled():
            clock.mark("update_start")
        return forward(model, *a, **k)

    ppo_trainer.batch_generation = timed_generation
    ppo_trainer.forward = timed_forward

    class EndOfIteration(TrainerCallback):
        def on_step_end(self, _args, _state, control, **_kwargs):
            m = clock.marks
            end = time.perf_counter()
            clock.iterations.append({
                "generation_s": m["generation_end"] - m["generation_start"],
                "scoring_s": m["update_start"] - m["generation_end"],
                "update_s": end - m["update_start"],
                "total_s": end - m["generation_start"],
            })
            clock.marks = {}
            return control

    trainer = PPOTrainer(
        args=settings,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        callbacks=[EndOfIteration()],
    )
    trainer.train()

    timed = clock.iterations[args.warmup:]
    for i, row in enumerate(timed, 1):
        print(json.dumps({"iteration": i, **{k: round(v, 3) for k, v in row.items()}}), flush=True)
    median = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    print(
        f"TRL {trl.__version__}: {median['total_s']:.1f} s per iteration = generation "
        f"{median['generation_s']:.1f} s + scoring {median['scoring_s']:.1f} s + update "
        f"{median['update_s']:.1f} s (median of {len(timed)}; {args.prompts} prompts of "
        f"{args.prompt_len} tokens, {args.new_tokens} new tokens, {args.threads} threads)",
        flush=True,
    )


if __name__ == "__main__":
    main()
