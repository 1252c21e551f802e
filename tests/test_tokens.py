"""Tokenisation helpers on the tiny word-level GPT-2 and on a small byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from mechedit.prompts import FactPrompt, PromptPair
from mechedit.tokens import (
    answer_id,
    answer_ids,
    model_device,
    single_token_id,
    subject_token_positions,
    token_ids,
    tokenize_continuations,
    tokenize_facts,
    tokenize_pairs,
    tokenize_prompts,
)


@pytest.fixture(scope="module")
def bpe():
    """A GPT-2-style byte-level BPE trained in the test: ' Paris' and 'Paris' are both tokens,
    ' Antarctica' is one token but 'Antarctica' (no space) is three."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The Eiffel Tower is in Paris.",
        "Vinson Massif is located in the continent of Antarctica.",
        "Paris is a city in France.",
    ] * 50
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def vocab_id(tok, piece: str) -> int:
    return tok.convert_tokens_to_ids(piece)


# ---------------------------------------------------------------------------------------------
# BOS and padding
# ---------------------------------------------------------------------------------------------


def test_single_prompts_match_the_bridge(tiny_bridge):
    for text in ["w1 w2 w3", "w7", "w10 w11 w12 w13 w14"]:
        batch = tokenize_prompts(tiny_bridge, [text])
        assert torch.equal(batch.tokens, tiny_bridge.to_tokens(text))
        assert batch.last_positions.tolist() == [batch.tokens.shape[1] - 1]
        no_bos = tokenize_prompts(tiny_bridge, [text], prepend_bos=False)
        assert torch.equal(no_bos.tokens, tiny_bridge.to_tokens(text, prepend_bos=False))


def test_bos_is_never_doubled(tiny_bridge):
    bos = tiny_bridge.tokenizer.bos_token_id
    assert tiny_bridge.to_tokens("<bos> w1 w2")[0, :2].tolist() == [bos, bos]  # the pitfall
    batch = tokenize_prompts(tiny_bridge, ["<bos> w1 w2", "w1 w2"])
    assert batch.tokens.tolist() == [[bos, 6, 7], [bos, 6, 7]]


def test_right_padding_and_last_positions(tiny_bridge):
    pad = tiny_bridge.tokenizer.pad_token_id
    batch = tokenize_prompts(tiny_bridge, ["w1 w2 w3", "w4", "w5 w6"])
    assert batch.padding_side == "right"
    assert batch.tokens.tolist() == [[0, 6, 7, 8], [0, 9, pad, pad], [0, 10, 11, pad]]
    assert batch.last_positions.tolist() == [3, 1, 2]
    assert batch.attention_mask.sum(1).tolist() == [4, 2, 3]


def test_right_padding_leaves_real_positions_unchanged(tiny_bridge):
    texts = ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"]
    batch = tokenize_prompts(tiny_bridge, texts)
    with torch.no_grad():
        padded = tiny_bridge(batch.tokens)
        for row, text in enumerate(texts):
            alone = tiny_bridge(tiny_bridge.to_tokens(text))[0]
            n = alone.shape[0]
            torch.testing.assert_close(padded[row, :n], alone, atol=1e-5, rtol=1e-5)


def test_left_padding_with_attention_mask(tiny_bridge):
    texts = ["w1 w2 w3 w4", "w6 w7"]
    batch = tokenize_prompts(tiny_bridge, texts, padding_side="left")
    assert batch.last_positions.tolist() == [4, 4]
    assert batch.attention_mask.tolist() == [[True] * 5, [False, False, True, True, True]]
    with torch.no_grad():
        logits = tiny_bridge(batch.tokens, attention_mask=batch.attention_mask)
        for row, text in enumerate(texts):
            alone = tiny_bridge(tiny_bridge.to_tokens(text))[0, -1]
            torch.testing.assert_close(logits[row, -1], alone, atol=1e-4, rtol=1e-4)


def test_prompt_errors(tiny_bridge):
    with pytest.raises(ValueError, match="not one string"):
        tokenize_prompts(tiny_bridge, "w1 w2")
    with pytest.raises(ValueError, match="no prompts"):
        tokenize_prompts(tiny_bridge, [])
    with pytest.raises(ValueError, match="longer than the model's context"):
        tokenize_prompts(tiny_bridge, [" ".join(["w1"] * 70)])
    with pytest.raises(ValueError, match="prompt 1 'w1 Paris'.*does not know"):
        tokenize_prompts(tiny_bridge, ["w1", "w1 Paris"])


# ---------------------------------------------------------------------------------------------
# Targets: single tokens, multi-token targets, answers in context
# ---------------------------------------------------------------------------------------------


def test_single_token_id_word_level(tiny_bridge):
    tok = tiny_bridge.tokenizer
    assert single_token_id(tiny_bridge, "w1") == vocab_id(tok, "w1")
    assert single_token_id(tok, "w1") == vocab_id(tok, "w1")
    with pytest.raises(ValueError, match=r"'w1 w2' is 2 tokens, not 1: \['w1', 'w2'\]"):
        single_token_id(tiny_bridge, "w1 w2")
    with pytest.raises(ValueError, match="does not know"):
        single_token_id(tiny_bridge, "Paris")
    assert token_ids(tiny_bridge, "w1 w2") == [vocab_id(tok, "w1"), vocab_id(tok, "w2")]


def test_multi_token_target_lists_pieces_and_suggests_leading_space(bpe):
    with pytest.raises(ValueError) as info:
        single_token_id(bpe, "Antarctica")
    message = str(info.value)
    assert "['Ant', 'arct', 'ica']" in message
    assert "' Antarctica' is a single token" in message
    assert single_token_id(bpe, " Antarctica") == vocab_id(bpe, "ĠAntarctica")


def test_answer_in_context_picks_the_predicted_token(bpe, tiny_bridge):
    # 'Paris' and ' Paris' are both single BPE tokens; after a prompt the model predicts ' Paris'
    assert single_token_id(bpe, "Paris") == vocab_id(bpe, "Paris")
    assert answer_id(bpe, "The Eiffel Tower is in", "Paris") == vocab_id(bpe, "ĠParis")
    assert answer_id(bpe, "The Eiffel Tower is in", " Paris") == vocab_id(bpe, "ĠParis")
    assert answer_ids(bpe, "continent of", "Antarctica") == [vocab_id(bpe, "ĠAntarctica")]
    # word-level: spaces only separate, so the answer is the word itself
    w5 = vocab_id(tiny_bridge.tokenizer, "w5")
    assert answer_id(tiny_bridge, "w1 w2", "w5") == w5
    assert answer_id(tiny_bridge, "w1 w2", " w5") == w5
    assert answer_ids(tiny_bridge, "w1 w2", "w5 w6") == [w5, w5 + 1]
    with pytest.raises(ValueError, match=r"2 tokens after prompt 'w1 w2': \['w5', 'w6'\]"):
        answer_id(tiny_bridge, "w1 w2", "w5 w6")


def test_answer_after_a_trailing_space_is_an_error_for_bpe(bpe):
    with pytest.raises(ValueError, match="Remove the trailing whitespace"):
        answer_id(bpe, "The Eiffel Tower is in ", "Paris")


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def test_tokenize_pairs(tiny_bridge):
    pairs = [
        PromptPair(clean="w1 w2 w3", corrupt="w4 w2 w3", answer="w5", wrong_answer="w6"),
        PromptPair(clean="w7", corrupt="w8", answer="w9", wrong_answer="w10"),
    ]
    batch = tokenize_pairs(tiny_bridge, pairs)
    tok = tiny_bridge.tokenizer
    assert batch.clean_tokens[0].tolist() == tiny_bridge.to_tokens("w1 w2 w3")[0].tolist()
    assert batch.corrupt_tokens[1, :2].tolist() == tiny_bridge.to_tokens("w8")[0].tolist()
    assert batch.last_positions.tolist() == [3, 1]
    assert batch.answer_ids.tolist() == [vocab_id(tok, "w5"), vocab_id(tok, "w9")]
    assert batch.wrong_ids.tolist() == [vocab_id(tok, "w6"), vocab_id(tok, "w10")]
    assert len(batch) == 2


def test_tokenize_pairs_length_mismatch_names_pair_and_tokenisations(tiny_bridge):
    pairs = [
        PromptPair(clean="w1 w2", corrupt="w3 w2", answer="w5", wrong_answer="w6"),
        PromptPair(clean="w1 w2", corrupt="w3 w4 w2", answer="w5", wrong_answer="w6", pair_id="x"),
    ]
    with pytest.raises(ValueError) as info:
        tokenize_pairs(tiny_bridge, pairs)
    message = str(info.value)
    assert "pair 1 (id 'x')" in message
    assert "clean   (3 tokens): ['<bos>', 'w1', 'w2']" in message
    assert "corrupt (4 tokens): ['<bos>', 'w3', 'w4', 'w2']" in message


def test_tokenize_pairs_multi_token_answer(tiny_bridge):
    pair = PromptPair(clean="w1 w2", corrupt="w3 w2", answer="w5 w6", wrong_answer="w7")
    with pytest.raises(ValueError, match="pair 0: answer 'w5 w6' is 2 tokens"):
        tokenize_pairs(tiny_bridge, [pair])


# ---------------------------------------------------------------------------------------------
# Facts and subject positions
# ---------------------------------------------------------------------------------------------


def test_subject_token_positions_word_level(tiny_bridge):
    prompt = "w1 w2 w3 w4 w5"
    positions = subject_token_positions(tiny_bridge, prompt, "w2 w3")
    assert positions == range(2, 4)  # BOS at 0, w1 at 1
    assert tiny_bridge.to_str_tokens(prompt)[positions.start : positions.stop] == ["w2", "w3"]
    assert subject_token_positions(tiny_bridge, prompt, "w2 w3", prepend_bos=False) == range(1, 3)
    assert subject_token_positions(tiny_bridge, prompt, "w1") == range(1, 2)
    # a FactPrompt's span picks the occurrence, here the second w1
    fact = FactPrompt(prompt="w1 w2 w1 w3", subject="w1", subject_span=(6, 8), target="w4")
    assert subject_token_positions(tiny_bridge, fact) == range(3, 4)
    with pytest.raises(ValueError, match="'w9' does not occur in prompt"):
        subject_token_positions(tiny_bridge, prompt, "w9")
    with pytest.raises(ValueError, match="has no subject"):
        subject_token_positions(tiny_bridge, FactPrompt(prompt="w1", target="w2"))


def test_subject_token_positions_bpe(bpe):
    prompt = "The Eiffel Tower is in"
    ids = tokenize_prompts(bpe, [prompt]).tokens[0].tolist()
    positions = subject_token_positions(bpe, prompt, "Eiffel Tower")
    # the subject's BPE tokens carry their leading space; the neighbours stay outside
    assert bpe.decode(ids[positions.start : positions.stop]) == " Eiffel Tower"
    assert bpe.decode(ids[1 : positions.start]) == "The"
    assert bpe.decode(ids[positions.stop :]) == " is in"
    assert subject_token_positions(bpe, "Vinson Massif is located", "Vinson Massif") == range(1, 3)


def test_tokenize_facts(tiny_bridge):
    tok = tiny_bridge.tokenizer
    facts = [
        FactPrompt(
            prompt="w1 w2 w3", subject="w1", target="w4", target_new="w5", candidates=("w4", "w5")
        ),
        FactPrompt(
            prompt="w6", subject="w6", target="w8", target_new="w7", candidates=("w7", "w8")
        ),
    ]
    batch = tokenize_facts(tiny_bridge, facts)
    ids = {w: vocab_id(tok, w) for w in ("w4", "w5", "w7", "w8")}
    assert batch.target_ids.tolist() == [ids["w4"], ids["w8"]]
    assert batch.target_new_ids.tolist() == [ids["w5"], ids["w7"]]
    assert batch.candidate_ids.tolist() == [[ids["w4"], ids["w5"]], [ids["w7"], ids["w8"]]]
    assert batch.answer_index.tolist() == [0, 1]
    assert batch.last_positions.tolist() == [3, 1]

    plain = tokenize_facts(tiny_bridge, [FactPrompt(prompt="w1", target="w2")])
    assert plain.target_new_ids is None and plain.candidate_ids is None

    with pytest.raises(ValueError, match=r"fact 1 \(record 9\): answer 'w2 w3' is 2 tokens"):
        tokenize_facts(
            tiny_bridge,
            [
                FactPrompt(prompt="w1", target="w2"),
                FactPrompt(prompt="w1", target="w2 w3", record_id=9),
            ],
        )
    with pytest.raises(ValueError, match="candidate sets of different sizes"):
        tokenize_facts(
            tiny_bridge,
            [
                FactPrompt(prompt="w1", target="w2", candidates=("w2", "w3")),
                FactPrompt(prompt="w1", target="w2", candidates=("w2", "w3", "w4")),
            ],
        )


# ---------------------------------------------------------------------------------------------
# Continuations
# ---------------------------------------------------------------------------------------------


def test_tokenize_continuations_records_where_each_continuation_starts(tiny_bridge):
    tok = tiny_bridge.tokenizer
    bos, pad = tok.bos_token_id, tok.pad_token_id
    w = {f"w{i}": vocab_id(tok, f"w{i}") for i in range(1, 10)}
    batch = tokenize_continuations(tiny_bridge, ["w1 w2", "", "w3"], ["w4 w5", "w6 w7 w8", "w9"])
    assert batch.tokens.tolist() == [
        [bos, w["w1"], w["w2"], w["w4"], w["w5"]],
        [bos, w["w6"], w["w7"], w["w8"], pad],
        [bos, w["w3"], w["w9"], pad, pad],
    ]
    assert batch.continuation_starts.tolist() == [3, 1, 2]
    assert batch.continuation_lengths.tolist() == [2, 3, 1]
    assert batch.last_positions.tolist() == [4, 3, 2]
    assert batch.attention_mask.sum(1).tolist() == [5, 4, 3]
    # the prompt-and-continuation row is exactly what the model sees for the joined text
    assert torch.equal(batch.tokens[:1], tiny_bridge.to_tokens("w1 w2 w4 w5"))

    left = tokenize_continuations(
        tiny_bridge, ["w1 w2", "w3"], ["w4 w5", "w9"], padding_side="left"
    )
    assert left.tokens.tolist()[1] == [pad, pad, bos, w["w3"], w["w9"]]
    assert left.continuation_starts.tolist() == [3, 4]

    no_bos = tokenize_continuations(tiny_bridge, ["w1 w2"], ["w4"], prepend_bos=False)
    assert no_bos.tokens.tolist() == [[w["w1"], w["w2"], w["w4"]]]
    assert no_bos.continuation_starts.tolist() == [2]
    with pytest.raises(ValueError, match="prompt 0 is empty and no BOS"):
        tokenize_continuations(tiny_bridge, [""], ["w4"], prepend_bos=False)
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        tokenize_continuations(tiny_bridge, ["w1", "w2"], ["w4"])
    with pytest.raises(ValueError, match="continuation 1 must be a non-empty string"):
        tokenize_continuations(tiny_bridge, ["w1", "w2"], ["w4", " "])
    with pytest.raises(ValueError, match="continuation 0 'w4 Paris'.*does not know"):
        tokenize_continuations(tiny_bridge, [""], ["w4 Paris"])


def test_tokenize_continuations_resolves_bpe_continuations_in_context(bpe):
    batch = tokenize_continuations(bpe, ["The Eiffel Tower is in"], ["Paris."])
    start, n = batch.continuation_starts.item(), batch.continuation_lengths.item()
    continuation = batch.tokens[0, start : start + n].tolist()
    assert continuation == answer_ids(bpe, "The Eiffel Tower is in", "Paris.")
    assert bpe.decode(continuation) == " Paris."
    with pytest.raises(ValueError, match="continuation 0: answer 'Paris' does not tokenise"):
        tokenize_continuations(bpe, ["The Eiffel Tower is in "], ["Paris"])


# ---------------------------------------------------------------------------------------------
# Devices: tokens follow the model
# ---------------------------------------------------------------------------------------------


class _MetaModel(torch.nn.Module):
    """A stand-in model whose parameters live on the meta device, with a real tokenizer."""

    def __init__(self, tokenizer, cfg):
        super().__init__()
        self.tokenizer, self.cfg = tokenizer, cfg
        self.weight = torch.nn.Parameter(torch.empty(2, 2, device="meta"))


def _every_tokenizer(model, **kwargs):
    facts = [FactPrompt(prompt="w1 w2", target="w3", target_new="w4", candidates=("w3", "w4"))]
    pairs = [PromptPair(clean="w1 w2", corrupt="w5 w2", answer="w3", wrong_answer="w4")]
    return [
        tokenize_prompts(model, ["w1 w2", "w3"], **kwargs),
        tokenize_pairs(model, pairs, **kwargs),
        tokenize_facts(model, facts, **kwargs),
        tokenize_continuations(model, ["w1", ""], ["w2 w3", "w4"], **kwargs),
    ]


def _tensors(batch):
    return [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]


def test_tokens_follow_the_model_device(tiny_bridge):
    assert model_device(tiny_bridge) == torch.device("cpu")
    assert model_device(tiny_bridge.tokenizer) == torch.device("cpu")
    on_cpu = _every_tokenizer(tiny_bridge)
    assert all(t.device.type == "cpu" for b in on_cpu for t in _tensors(b))

    meta_model = _MetaModel(tiny_bridge.tokenizer, tiny_bridge.cfg)
    assert model_device(meta_model) == torch.device("meta")
    for cpu_batch, meta_batch in zip(on_cpu, _every_tokenizer(meta_model), strict=True):
        assert type(meta_batch) is type(cpu_batch) and meta_batch.device.type == "meta"
        assert all(t.device.type == "meta" for t in _tensors(meta_batch))
        for a, b in zip(_tensors(cpu_batch), _tensors(meta_batch), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
    # device= overrides the model's, and a bare tokenizer gives CPU tensors
    assert all(b.device.type == "meta" for b in _every_tokenizer(tiny_bridge, device="meta"))
    moved = on_cpu[2].to("meta")
    assert moved.candidate_ids.device.type == "meta" and on_cpu[2].device.type == "cpu"
    with pytest.raises(ValueError, match="move the whole batch"):
        type(on_cpu[0])(
            on_cpu[0].tokens, on_cpu[0].attention_mask.to("meta"), on_cpu[0].last_positions
        )
