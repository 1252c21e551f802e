"""Randomly initialised GPT-2 checkpoints of any shape, for tests and benchmarks.

A real model is not needed to test plumbing or to time a method at GPT-2-small scale; a
seeded random model written as an ordinary HF checkpoint folder is, and it needs no network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mechedit.zoo.tokenizer import SPECIAL_TOKENS, build_tokenizer, save_tokenizer


def random_gpt2_checkpoint(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 64,
    vocab_words: int = 59,
    seed: int = 0,
) -> Path:
    """Write a seeded random GPT-2 and a word-level tokenizer to ``out_dir``; return the folder.

    The vocabulary is the special tokens followed by ``w0 .. w{vocab_words-1}``, so prompts such as
    ``"w1 w2 w3"`` tokenize to one token per word. GPT-2 small is ``n_layer=12, n_embd=768,
    n_head=12, n_positions=1024`` (with ``vocab_words=50252`` for its vocabulary size).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(f"w{i}" for i in range(vocab_words))
    config = GPT2Config(
        vocab_size=len(SPECIAL_TOKENS) + vocab_words,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    return out
