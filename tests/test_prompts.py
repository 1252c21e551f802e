"""The shared prompt types: validation of FactPrompt, PromptPair and the tokenised batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mechedit.prompts import FactPrompt, PromptPair, TokenizedPrompts


def test_fact_prompt_validation():
    fact = FactPrompt(prompt="w1 w2 w1 w3", subject="w1", subject_span=(6, 8), target="w4")
    assert fact.subject_span == (6, 8)
    assert FactPrompt(prompt="w1 w2 w1 w3", subject="w1", target="w4").subject_span == (0, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fact.target = "w5"
    with pytest.raises(ValueError, match="does not occur in prompt.*different letter case"):
        FactPrompt(prompt="the Eiffel Tower is in", subject="The Eiffel Tower", target="Paris")
    with pytest.raises(ValueError, match="selects 'w2'"):
        FactPrompt(prompt="w1 w2", subject="w1", subject_span=(3, 5), target="w4")
    with pytest.raises(ValueError, match="without a subject"):
        FactPrompt(prompt="w1 w2", subject_span=(0, 2), target="w4")
    with pytest.raises(ValueError, match="not among the candidates"):
        FactPrompt(prompt="w1 w2", target="w4", candidates=("w5", "w6"))
    with pytest.raises(ValueError, match="single string"):
        FactPrompt(prompt="w1 w2", target="w4", candidates="w4")
    with pytest.raises(ValueError, match="duplicates"):
        FactPrompt(prompt="w1 w2", target="w4", candidates=("w4", "w4"))
    with pytest.raises(ValueError, match="target must be a non-empty string"):
        FactPrompt(prompt="w1 w2", target=" ")
    listed = FactPrompt(prompt="w1 w2", target="w4", candidates=["w5", "w4"])
    assert listed.candidates == ("w5", "w4") and listed.answer_index == 1


def test_prompt_pair_validation():
    pair = PromptPair(clean="w1 w2", corrupt="w3 w2", answer="w4", wrong_answer="w5", pair_id="a")
    assert pair.pair_id == "a"
    with pytest.raises(ValueError, match="logit difference is always 0"):
        PromptPair(clean="w1 w2", corrupt="w3 w2", answer="w4", wrong_answer="w4")
    with pytest.raises(ValueError, match="corrupt must be a non-empty string"):
        PromptPair(clean="w1 w2", corrupt="", answer="w4", wrong_answer="w5")
    with pytest.raises(TypeError):
        PromptPair("w1 w2", "w3 w2", "w4", "w5")  # keyword-only: answer/wrong cannot be swapped


def test_tokenized_batch_validation():
    tokens = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.bool)
    TokenizedPrompts(tokens, mask, torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        TokenizedPrompts(tokens, mask[:, :2], torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="last_positions must lie in"):
        TokenizedPrompts(tokens, mask, torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="padding_side"):
        TokenizedPrompts(tokens, mask, torch.tensor([2, 1]), "middle")
