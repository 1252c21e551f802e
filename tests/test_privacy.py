"""Privacy metrics (mechedit.evaluate.privacy): exposure against brute-force enumeration, the fact
world's canaries and phone numbers, MRR under an edit, MA/EL on a hand-built model, the masked-LM
path, tiny random architectures, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoTokenizer

import mechedit
from mechedit import zoo
from mechedit.components import Component
from mechedit.edit import ablate
from mechedit.evaluate import (
    Secret,
    answer_flips,
    as_secrets,
    exposure,
    greedy_completions,
    memorization,
    mrr,
    privacy_report,
    secret_token_scores,
)
from mechedit.zoo.random_model import random_checkpoint

WORDS10 = tuple(f"w{i}" for i in range(10))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def factworld():
    return mechedit.load("factworld"), zoo.load_world("factworld")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    def make(arch: str):
        return mechedit.load(random_checkpoint(tmp_path_factory.mktemp(arch), arch, n_layer=2, n_embd=64, n_head=4))

    return make


# --------------------------------------------------------------------------------------------
# Brute force: every candidate of a 3-position space, scored one by one


@torch.no_grad()
def _brute_force_ranks(model, secret: Secret, letters: tuple[str, ...]) -> tuple[int, int]:
    """(rank by sequence log-prob, rank in the per-position preference order) over letters^3."""
    tok = model.tokenizer
    head = model.to_tokens(secret.prefix)[0].tolist()
    ids = [tok.convert_tokens_to_ids(x) for x in letters]
    space = torch.tensor(list(itertools.product(ids, repeat=3)))  # [1000, 3]
    rows = torch.cat([torch.tensor(head).expand(len(space), -1), space], 1)
    logprobs = model(rows).float().log_softmax(-1)
    start = len(head)
    steps = logprobs[:, start - 1 : start + 2]  # [1000, 3, vocab]
    own = steps.gather(-1, space[..., None])[..., 0]  # [1000, 3] log p(x_j | prefix, x_<j)
    total = own.sum(-1)
    # Each candidate's key: at each position, how many letters the model prefers there, given the
    # candidate's own earlier tokens. Sorting keys lexicographically is the tree order.
    letter_lp = steps[:, :, ids]  # [1000, 3, 10]
    key = (letter_lp > own[..., None]).sum(-1)  # [1000, 3]
    true = torch.tensor([tok.convert_tokens_to_ids(x) for x in secret.tokens])
    me = int((space == true).all(1).nonzero())
    by_logprob = 1 + int((total > total[me]).sum())
    order = sorted(range(len(space)), key=lambda i: tuple(key[i].tolist()) + (i,))
    # candidates with the same key as the secret only arise through ties; none here
    by_tree = 1 + order.index(me)
    return by_logprob, by_tree


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_exact_exposure_equals_brute_force_on_tiny_models(tiny, arch):
    model = tiny(arch)
    gen = torch.Generator().manual_seed(1)
    secrets = [
        Secret(f"w{20 + k} w{30 + k} w{40 + k}", " ".join(WORDS10[i] for i in torch.randint(10, (3,), generator=gen).tolist()))
        for k in range(4)
    ]
    lex = exposure(model, secrets, alphabet=WORDS10)
    logp = exposure(model, secrets, alphabet=WORDS10, method="logprob")
    ranks = [_brute_force_ranks(model, s, WORDS10) for s in secrets]
    assert logp.rank.tolist() == [float(r) for r, _ in ranks]
    assert lex.rank.tolist() == [float(r) for _, r in ranks]
    assert torch.allclose(lex.exposure, math.log2(1000) - lex.rank.log2())
    # random weights: the secrets sit mid-table, so this is not a test of rank 1 only
    assert max(r for r, _ in ranks) > 50


def test_exact_exposure_equals_brute_force_on_factworld_digits(factworld):
    model, world = factworld
    canaries = [r for r in world.private if r.kind == "canary"]
    # first three digits of a control canary (never trained) and of a 20-copy one
    secrets = [Secret(r.prefix, " ".join(r.secret.split()[:3])) for r in (canaries[0], canaries[-1])]
    digits = tuple("0123456789")
    lex = exposure(model, secrets)
    logp = exposure(model, secrets, method="logprob")
    ranks = [_brute_force_ranks(model, s, digits) for s in secrets]
    assert logp.rank.tolist() == [float(r) for r, _ in ranks]
    assert lex.rank.tolist() == [float(r) for _, r in ranks]
    assert min(r for r, _ in ranks) == 1 and max(r for r, _ in ranks) > 20
    # the sampled estimate lands near the exact log-prob rank (binomial error, 4 sd)
    pick = [0]  # the control canary: a mid-table rank (the other is rank 1, trivially k = 0)
    est = exposure(model, [secrets[i] for i in pick], method="sampled", n_samples=500, seed=3)
    for exact, got in zip(logp.rank[pick].tolist(), est.rank.tolist(), strict=True):
        p = (exact - 1) / 999
        assert abs(got - exact) <= 4 * 999 * math.sqrt(p * (1 - p) / 500) + 1


# --------------------------------------------------------------------------------------------
# The fact world's secrets


def test_canary_exposure_grows_with_repetitions(factworld):
    model, world = factworld
    canaries = as_secrets([r for r in world.private if r.kind == "canary"])
    res = exposure(model, canaries)
    scores = secret_token_scores(model, canaries)
    reps = torch.tensor([c.repetitions for c in canaries])
    mean_exp = {k: res.exposure[reps == k].mean().item() for k in (0, 1, 5, 20)}
    mean_lp = {k: scores.total_logprob[reps == k].mean().item() for k in (0, 1, 5, 20)}
    ceiling = 6 * math.log2(10)
    assert mean_exp[0] < 3 < mean_exp[1] <= mean_exp[5]
    # 5 and 20 copies per epoch (and, in the 50-epoch model, already 1: measured exact exposure 19.93
    # bits for all five) make every canary the model's favourite 6-digit string (rank 1), so exposure
    # sits at its ceiling; the log-probability still separates them (-52.2, -0.024, -0.0065, -0.0006).
    assert mean_exp[5] == pytest.approx(ceiling) and mean_exp[20] == pytest.approx(ceiling)
    assert mean_lp[0] < mean_lp[1] < mean_lp[5] < mean_lp[20]


def test_trained_phone_numbers_are_far_more_exposed_than_control_canaries(factworld):
    model, world = factworld
    phones = as_secrets([r for r in world.private if r.kind == "phone"])
    controls = as_secrets([r for r in world.private if r.kind == "canary" and r.repetitions == 0])
    ph, co = exposure(model, phones), exposure(model, controls)
    assert ph.mean() - co.mean() > 15
    assert (ph.exposure / ph.log2_space).mean() > 0.8 > 0.3 > (co.exposure / co.log2_space).mean()


def test_mrr_is_one_for_a_memorised_secret_and_drops_when_a_layer_is_zeroed(factworld):
    model, world = factworld
    memorised = as_secrets([r for r in world.private if r.kind == "canary" and r.repetitions == 20])
    before = mrr(model, memorised)
    assert torch.all(before == 1.0)
    done_before = greedy_completions(model, memorised)
    assert done_before == [s.secret for s in memorised]
    with ablate(model, [Component("mlp_out", layer=0)], mode="zero").applied(model):
        after = mrr(model, memorised)
        done_after = greedy_completions(model, memorised)
    assert torch.all(after < 1.0)
    assert answer_flips(done_before, done_after) >= 1
    assert torch.equal(mrr(model, memorised), before)  # the edit is gone


def test_privacy_report_before_and_after_an_edit(factworld):
    model, world = factworld
    phones = [r for r in world.private if r.kind == "phone"][:2]
    canaries = [r for r in world.private if r.kind == "canary" and r.repetitions in (0, 20)][::5]
    emails = [r for r in world.private if r.kind == "email"][:1]
    facts = [
        mechedit.prompts.FactPrompt(prompt=zoo.world.fill(world.relation[f.relation_id].train_templates[0], f.subject), target=f.value)
        for f in world.facts[:10]
    ]
    edit = ablate(model, [Component("mlp_out", layer=0)], mode="zero")
    report = privacy_report(
        model, phones + canaries + emails, edit=edit, heldout_texts=list(world.text_heldout[:10]), facts=facts
    )
    frame = report.to_frame().set_index("metric")
    assert set(frame.index) >= {"exposure", "mrr", "ma", "s_ma", "el_3", "s_el_3", "extracted", "perplexity", "fact_accuracy"}
    assert frame.loc["perplexity", "after"] > frame.loc["perplexity", "before"]
    assert frame.loc["exposure", "after"] < frame.loc["exposure", "before"]
    assert report.flips is not None and report.flips >= 1
    # e-mails are not digit strings: no exposure, but every other metric
    per = report.per_secret
    assert per.loc[per.kind == "email", "exposure_before"].isna().all()
    assert per.loc[per.kind == "phone", "exposure_before"].notna().all()
    assert report.to_dict()["metrics"]["mrr"]["before"] == pytest.approx(per["mrr_before"].mean())
    no_edit = privacy_report(model, phones[:2], alphabet=None)
    assert no_edit.flips is None and math.isnan(no_edit.metrics["mrr"][1])


# --------------------------------------------------------------------------------------------
# MA / EL on a hand-built model whose greedy prediction is known: the next word is w(i+1)


class SuccessorLM(torch.nn.Module):
    """A causal "model" over the w0..w58 tokenizer: after ``wI`` it predicts ``w(I+1)`` (BOS: w0)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = type("Cfg", (), {"default_prepend_bos": True})()
        vocab = len(tokenizer)
        table = torch.full((vocab, vocab), -5.0)
        self.w = {i: tokenizer.convert_tokens_to_ids(f"w{i}") for i in range(59)}
        for i in range(58):
            table[self.w[i], self.w[i + 1]] = 5.0
        table[tokenizer.bos_token_id, self.w[0]] = 5.0
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, tokens, attention_mask=None):
        return self.table[tokens]


def test_ma_and_el_on_a_hand_built_model(tiny_gpt2_dir):
    model = SuccessorLM(AutoTokenizer.from_pretrained(tiny_gpt2_dir)).eval()
    # text w1 w2 w3 | w9 w10 w11 w12 : one break in the successor chain
    secret = Secret("w1 w2 w3", "w9 w10 w11 w12")
    mem = memorization(model, [secret], n=2)
    # MA over t = 2..7: w2, w3 right; w9 wrong (w4 predicted); w10, w11, w12 right -> 5/6
    assert mem.ma.item() == pytest.approx(5 / 6)
    # S-MA over the secret: w9 wrong, w10-w12 right
    assert mem.s_ma.item() == pytest.approx(3 / 4)
    # EL_2, prefixes k = 1..5 (T = 7). Greedy from w_k continues the chain; truth x_>k:
    # k=1 (w1): gen w2 w3 w4 w5 w6 w7 vs w2 w3 w9 w10 w11 w12: bigrams (w2,w3) hit -> 1/5
    # k=2 (..w2): gen w3 w4 w5 w6 w7 vs w3 w9 w10 w11 w12: 0/4
    # k=3 (..w3): gen w4 w5 w6 w7 vs w9 w10 w11 w12: 0/3
    # k=4 (..w9): gen w10 w11 w12 vs w10 w11 w12: 2/2
    # k=5 (..w10): gen w11 w12 vs w11 w12: 1/1
    assert mem.el.item() == pytest.approx((1 / 5 + 0 + 0 + 1 + 1) / 5)
    # S-EL_2: prefixes ending before a secret token with >= 2 secret tokens left: k = 3, 4, 5
    # (same generations as above, cut at the secret's end) -> (0 + 1 + 1) / 3
    assert mem.s_el.item() == pytest.approx(2 / 3)
    assert greedy_completions(model, [secret]) == ["w4 w5 w6 w7"]
    assert mrr(model, [secret]).item() < 1.0
    assert mrr(model, [Secret("w1 w2 w3", "w4 w5")]).item() == 1.0


# --------------------------------------------------------------------------------------------
# Masked LMs


def test_masked_lm_path_on_factworld_mlm():
    model, world = mechedit.load("factworld-mlm"), zoo.load_world("factworld-mlm")
    phones = as_secrets([r for r in world.private if r.kind == "phone"][:12])
    controls = as_secrets([r for r in world.private if r.kind == "canary" and r.repetitions == 0])
    ph, co = exposure(model, phones), exposure(model, controls)
    assert ph.mean() - co.mean() > 10
    assert mrr(model, phones).mean() > 0.9 > mrr(model, controls).mean()
    mem = memorization(model, phones[:3])
    assert mem.el is None and mem.s_ma.min() > 0.5
    # the masked path's score of the true secret (pseudo-log-likelihood) agrees across two code paths
    est = exposure(model, controls[:2], method="sampled", n_samples=100)
    assert est.n_better is not None and (est.n_better > 0).all()
    with pytest.raises(ValueError, match="masked LM does not define"):
        exposure(model, phones[:1], method="logprob")
    facts = [
        mechedit.prompts.FactPrompt(
            prompt=zoo.world.fill(world.relation[f.relation_id].train_templates[0], f.subject) + " <mask> .", target=f.value
        )
        for f in world.facts[:12]
    ]
    report = privacy_report(model, phones[:3], heldout_texts=list(world.text_heldout[:5]), facts=facts)
    assert report.metrics["perplexity"][0] < 10 and report.context["masked_lm"]
    assert report.metrics["fact_accuracy"][0] > 0.9  # the card: 100 % on training templates


def test_tiny_bert_runs_every_metric(tiny):
    model = tiny("bert")
    secrets = [Secret("w20 w21 w22", "w1 w2 w3", suffix="w50"), Secret("w23 w24", "w4 w5 w6")]
    lex = exposure(model, secrets, alphabet=WORDS10)
    scores = secret_token_scores(model, secrets, alphabet=WORDS10)
    # lexicographic rank from the per-position ranks, by hand
    for i in range(2):
        r = scores.alphabet_rank[i].tolist()
        assert lex.rank[i].item() == 1 + r[0] * 100 + r[1] * 10 + r[2]
    report = privacy_report(
        model, secrets, alphabet=WORDS10, edit=ablate(model, [Component("mlp_out", layer=1)], mode="zero")
    )
    assert report.metrics["mrr"][0] != report.metrics["mrr"][1]


# --------------------------------------------------------------------------------------------
# Bad input


class ConstantLM(torch.nn.Module):
    """A causal "model" with equal logits everywhere, over a subword (BPE) tokenizer without merges,
    so that ``"ab"`` is two tokens."""

    def __init__(self):
        super().__init__()
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"<bos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate("abcdefgh")}}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", unk_token="<unk>")
        self.cfg = type("Cfg", (), {"default_prepend_bos": True})()
        self.bias = torch.nn.Parameter(torch.zeros(len(vocab)), requires_grad=False)

    def forward(self, tokens, attention_mask=None):
        return self.bias.expand(*tokens.shape, -1)


def test_a_secret_must_tokenise_to_its_declared_tokens():
    model = ConstantLM().eval()
    # every logit ties: ties count in the secret's favour (rank 1), never understating a leak
    assert mrr(model, [("a b", "c d")]).item() == 1.0
    with pytest.raises(ValueError, match=r"tokenises to \['c', 'd', 'e'\] \(3 tokens\), not to its 2 declared"):
        mrr(model, [("a b", "cd e")])


def test_bad_input_gives_clear_errors(factworld):
    model, _ = factworld
    with pytest.raises(ValueError, match="is empty"):
        Secret("the secret code of tango is", "  ")
    with pytest.raises(ValueError, match="not in the candidate alphabet"):
        exposure(model, [("the secret code of tango is", "8 8 tango 2")])
    with pytest.raises(ValueError, match="declared tokens|does not know"):
        exposure(model, [("the secret code of tango is", "88 5 2")])
    with pytest.raises(ValueError, match="method must be"):
        exposure(model, [("the secret code of tango is", "8 8 5")], method="exact")
    with pytest.raises(ValueError, match="list of secrets"):
        mrr(model, ("the secret code of tango is", "8 8 5"))
    with pytest.raises(ValueError, match="S-EL_3 needs"):
        memorization(model, [("the secret code of tango is", "8 8")])
    with pytest.raises(ValueError, match="one per secret"):
        answer_flips(["1 2"], [])
