"""Randomly initialised checkpoints of any shape and architecture, for tests and benchmarks.

A real model is not needed to test plumbing or to time a method at GPT-2-small scale; a
seeded random model written as an ordinary HF checkpoint folder is, and it needs no network.
``random_checkpoint`` builds GPT-2, GPT-NeoX, Llama and BERT (masked LM) models that share one
word-level tokenizer, so one prompt such as ``"w1 w2 w3"`` runs on all of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from mechedit.zoo.tokenizer import SPECIAL_TOKENS, build_tokenizer, save_tokenizer

ARCHITECTURES = ("gpt2", "neox", "llama", "bert")


def _config(arch: str, *, n_layer: int, n_embd: int, n_head: int, n_positions: int, vocab: int, tok):
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, **ids,
        )
    if arch == "neox":
        return GPTNeoXConfig(
            vocab_size=vocab, max_position_embeddings=n_positions, hidden_size=n_embd,
            num_hidden_layers=n_layer, num_attention_heads=n_head, intermediate_size=4 * n_embd,
            rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False, **ids,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, max_position_embeddings=n_positions, hidden_size=n_embd,
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
            intermediate_size=2 * n_embd + n_embd // 2, tie_word_embeddings=False, **ids,
        )
    if arch == "bert":
        return BertConfig(
            vocab_size=vocab, max_position_embeddings=n_positions, hidden_size=n_embd,
            num_hidden_layers=n_layer, num_attention_heads=n_head, intermediate_size=4 * n_embd,
            type_vocab_size=1, pad_token_id=tok.pad_token_id,
        )
    raise ValueError(f"architecture {arch!r} is not known; choose one of {', '.join(ARCHITECTURES)}")


_MODEL_CLASSES = {
    "gpt2": GPT2LMHeadModel,
    "neox": GPTNeoXForCausalLM,
    "llama": LlamaForCausalLM,
    "bert": BertForMaskedLM,
}


def random_checkpoint(
    out_dir: str | Path,
    arch: str = "gpt2",
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 64,
    vocab_words: int = 59,
    seed: int = 0,
) -> Path:
    """Write a seeded random ``arch`` model and a word-level tokenizer to ``out_dir``; return it.

    ``arch`` is one of ``"gpt2"`` (``GPT2LMHeadModel``, ``Conv1D`` weights, tied embeddings),
    ``"neox"`` (``GPTNeoXForCausalLM``, parallel attention + MLP, partial rotary), ``"llama"``
    (``LlamaForCausalLM``, gated MLP, RMSNorm, rotary) or ``"bert"`` (``BertForMaskedLM``,
    post-LayerNorm). The vocabulary is the special tokens followed by ``w0 .. w{vocab_words-1}``,
    so ``"w1 w2 w3"`` tokenizes to one token per word; BERT's mask token is ``<mask>``. GPT-2
    small is ``n_layer=12, n_embd=768, n_head=12, n_positions=1024`` (``vocab_words=50252``).
    The global RNG state is left as it was.
    """
    if arch not in _MODEL_CLASSES:
        raise ValueError(f"architecture {arch!r} is not known; choose one of {', '.join(ARCHITECTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(f"w{i}" for i in range(vocab_words))
    config = _config(
        arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        vocab=len(SPECIAL_TOKENS) + vocab_words, tok=tokenizer,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[arch](config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    return out


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
    """``random_checkpoint(out_dir, "gpt2", ...)``: a seeded random GPT-2 with a word tokenizer."""
    return random_checkpoint(
        out_dir, "gpt2", n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        n_positions=n_positions, vocab_words=vocab_words, seed=seed,
    )
