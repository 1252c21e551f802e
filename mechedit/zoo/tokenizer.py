"""Word-level tokenizers for the zoo's models: every word, digit and value is exactly one token.

Built with the ``tokenizers`` library and saved as ``tokenizer.json`` so that
``PreTrainedTokenizerFast`` (and so ``TransformerBridge.boot_transformers``) loads it offline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK, MASK = "<bos>", "<eos>", "<pad>", "<unk>", "<mask>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, MASK)


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over ``words`` (order kept, duplicates dropped).

    Ids 0..4 are BOS, EOS, PAD, UNK, MASK; ``words`` follow in the order given, so the same word
    list always gives the same ids.
    """
    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *words):
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocabulary entries must be non-empty and contain no spaces: {word!r}")
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        mask_token=MASK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Write ``tokenizer.json`` and its config; reloading through the folder is what TL expects."""
    tokenizer.save_pretrained(str(out_dir))
