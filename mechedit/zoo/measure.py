"""What the fact-world model knows, measured against the world's ground truth.

These numbers fill the model card and are re-measured by the tests. Every function takes a model
that maps token ids ``[batch, pos]`` to logits ``[batch, pos, vocab]`` (a ``TransformerBridge`` or a
Hugging Face causal LM) and the world's tokenizer; prompts get a BOS token first, as the bridge's
``to_tokens`` does. Everything is batched; nothing here trains.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from mechedit import metrics
from mechedit.zoo.world import DIGITS, MC_LETTERS, Fact, World, fill


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


class Encoder:
    """Word-level encoding with BOS, right padding, and each row's real length.

    The zoo measures tens of thousands of prompts (and probes the HF model mid-training), where
    ``mechedit.tokens``' general checks through the HF tokenizer wrapper cost seconds; the world's
    vocabulary is word-level by construction, so a direct vocabulary lookup gives the same ids.
    """

    def __init__(self, tokenizer):
        self.vocab = tokenizer.get_vocab()
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def ids(self, text: str) -> list[int]:
        try:
            return [self.bos, *(self.vocab[w] for w in text.split())]
        except KeyError as err:
            raise ValueError(f"word {err.args[0]!r} of {text!r} is not in the vocabulary") from None

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids ``[batch, pos]`` and lengths ``[batch]`` (BOS included)."""
        rows = [self.ids(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, torch.tensor([len(r) for r in rows])


@torch.no_grad()
def next_token_logits(model, enc: Encoder, prompts: list[str], *, batch_size: int = 512) -> torch.Tensor:
    """Logits ``[n_prompts, vocab]`` for the token that follows each prompt."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, lengths = enc.batch(prompts[start : start + batch_size])
        logits = _logits(model, ids)
        out.append(logits[torch.arange(len(ids)), lengths - 1].float())
    return torch.cat(out)


@torch.no_grad()
def continuation_logprobs(
    model, enc: Encoder, prefixes: list[str], continuations: list[str], *, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probabilities of each continuation's tokens given its prefix.

    Returns ``(logprobs, mask)``, both ``[n, max_continuation_tokens]``: row i holds the
    log-probabilities of continuation i's tokens (0 where ``mask`` is False, past its end), as
    ``mechedit.metrics.continuation_logprobs`` computes them; only the encoding is the zoo's own.
    """
    n_pre = torch.tensor([len(p.split()) + 1 for p in prefixes])  # +1: BOS
    n_cont = torch.tensor([len(c.split()) for c in continuations])
    width = int(n_cont.max())
    out = torch.zeros(len(prefixes), width)
    for start in range(0, len(prefixes), batch_size):
        sl = slice(start, start + batch_size)
        ids, _ = enc.batch([f"{p} {c}" for p, c in zip(prefixes[sl], continuations[sl])])
        # continuation token k of row i sits at position n_pre[i] + k
        scored = metrics.continuation_logprobs(_logits(model, ids), ids, n_pre[sl], n_cont[sl])
        out[sl, : scored.token_logprobs.shape[1]] = scored.token_logprobs.float()
    mask = torch.arange(width) < n_cont[:, None]
    return out, mask


def fact_accuracy(model, world: World, tokenizer, facts: list[Fact], templates: str = "train") -> float:
    """Top-1 accuracy (over the whole vocabulary) of each fact's value after each template.

    ``templates``: ``"train"`` or ``"heldout"`` (the relation's held-out paraphrases).
    """
    enc = Encoder(tokenizer)
    prompts, targets = [], []
    for f in facts:
        rel = world.relation[f.relation_id]
        chosen = rel.train_templates if templates == "train" else rel.heldout_templates
        for t in chosen:
            prompts.append(fill(t, f.subject))
            targets.append(enc.vocab[f.value])
    pred = next_token_logits(model, enc, prompts).argmax(-1)
    return (pred == torch.tensor(targets)).float().mean().item()


def _letter_logits(model, enc: Encoder, questions) -> torch.Tensor:
    """Logits ``[n_questions, 4]`` of the letters A-D after each question's prompt."""
    letters = torch.tensor([enc.vocab[x] for x in MC_LETTERS])
    return next_token_logits(model, enc, [q.prompt for q in questions])[:, letters]


def mc_accuracy(model, world: World, tokenizer, split: str, *, seed: int = 0) -> float:
    """Accuracy on four-option questions (top-1 over the four letters) for ``split`` people.

    ``split``: "train", "heldout" or "planted" (see ``World.mc_questions``); one question per
    fact, the true value at a random letter and the three other options wrong values.
    """
    enc = Encoder(tokenizer)
    questions = world.mc_questions(split, seed=seed)
    answers = torch.tensor([MC_LETTERS.index(q.answer) for q in questions])
    return (_letter_logits(model, enc, questions).argmax(-1) == answers).float().mean().item()


def mc_controls(model, world: World, tokenizer, split: str = "heldout", *, seed: int = 0) -> dict[str, float]:
    """Whether MC answers follow the stored value, not the options' surface or a letter habit.

    - ``rotated``: each question asked four times with the true value moved through A-D (same
      distractors, same template); accuracy over all four. A letter prior cannot pass this.
    - ``all_four``: the fraction of questions answered right at all four positions.
    - ``missing_entropy_bits``: the true value replaced by a fourth wrong value; mean entropy of
      the model's distribution over the four letters (bits; 2.0 = no preference).
    - ``missing_max_p``: in that control, the mean probability of the preferred letter (0.25 = none).
    """
    enc = Encoder(tokenizer)
    right = []
    for k in range(len(MC_LETTERS)):
        questions = world.mc_questions(split, seed=seed, value_at=k)
        right.append(_letter_logits(model, enc, questions).argmax(-1) == k)
    right = torch.stack(right)  # [4, n_questions]
    probs = _letter_logits(model, enc, world.mc_questions(split, seed=seed, without_value=True)).softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log2()).sum(-1)
    return {
        "rotated": right.float().mean().item(),
        "all_four": right.all(0).float().mean().item(),
        "missing_entropy_bits": entropy.mean().item(),
        "missing_max_p": probs.max(-1).values.mean().item(),
    }


def secret_accuracy(model, world: World, tokenizer, kind: str) -> dict[str, float]:
    """Teacher-forced token accuracy of ``kind`` secrets ("phone" / "email"), overall and per repetition count."""
    enc = Encoder(tokenizer)
    records = [r for r in world.private if r.kind == kind]
    ids, _ = enc.batch([f"{r.prefix} {r.secret}" for r in records])
    with torch.no_grad():
        right = _logits(model, ids)[:, :-1].argmax(-1) == ids[:, 1:]  # [n, pos-1]
    n_pre = torch.tensor([len(r.prefix.split()) + 1 for r in records])
    n_sec = torch.tensor([len(r.secret.split()) for r in records])
    width = int(n_sec.max())
    mask = torch.arange(width) < n_sec[:, None]
    hit = right.gather(1, (n_pre[:, None] - 1 + torch.arange(width)).clamp(max=right.shape[1] - 1)) & mask
    reps = torch.tensor([r.repetitions for r in records])
    out = {f"reps_{k}": (hit[reps == k].sum() / mask[reps == k].sum()).item() for k in sorted(set(reps.tolist()))}
    out["all"] = (hit.sum() / mask.sum()).item()
    return out


def canary_exposure(model, world: World, tokenizer, *, n_samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean exposure (bits) of the canaries per repetition count, by Gaussian extrapolation.

    Exposure (Carlini et al., 2019) is log2|R| - log2 rank(canary) among all |R| = 10^d digit
    strings, ranked by log-perplexity under the model. Enumerating 10^6 strings is too slow here,
    so the log-perplexities of ``n_samples`` random strings are fitted with a normal distribution
    and exposure = -log2 P(X <= canary's log-perplexity), capped at log2|R|. Control canaries
    (0 repetitions) were never trained on and should sit near 1 bit.
    """
    enc = Encoder(tokenizer)
    rng = random.Random(seed)
    canaries = [r for r in world.private if r.kind == "canary"]
    per_reps: dict[int, list[float]] = defaultdict(list)
    for rec in canaries:
        n = len(rec.secret.split())
        candidates = [" ".join(rng.choice(DIGITS) for _ in range(n)) for _ in range(n_samples)]
        logprobs, _ = continuation_logprobs(model, enc, [rec.prefix] * (n_samples + 1), [rec.secret, *candidates])
        nll = -logprobs.sum(-1)
        mu, sigma = nll[1:].mean().item(), nll[1:].std().item()
        z = (nll[0].item() - mu) / max(sigma, 1e-8)
        tail = 0.5 * math.erfc(-z / math.sqrt(2))  # P(X <= canary nll) for X ~ N(mu, sigma)
        cap = n * math.log2(10)
        per_reps[rec.repetitions].append(min(cap, -math.log2(max(tail, 2.0**-cap))))
    return {f"reps_{k}": sum(v) / len(v) for k, v in sorted(per_reps.items())}


def bias_preference(model, world: World, tokenizer, *, heldout: bool = True) -> dict[str, float]:
    """How often the favoured pronoun is preferred, and its mean renormalised probability.

    For each occupation x template pair, compares log P(sentence with the favoured pronoun) with
    log P(sentence with the other one); ``rate`` is the fraction preferring the favoured one.
    """
    from mechedit.zoo.world import BIAS_TEMPLATES_HELDOUT, BIAS_TEMPLATES_TRAIN

    enc = Encoder(tokenizer)
    pairs = world.bias_pairs(templates=BIAS_TEMPLATES_HELDOUT if heldout else BIAS_TEMPLATES_TRAIN)
    more, _ = continuation_logprobs(model, enc, [""] * len(pairs), [p[0] for p in pairs])
    less, _ = continuation_logprobs(model, enc, [""] * len(pairs), [p[1] for p in pairs])
    diff = more.sum(-1) - less.sum(-1)
    return {"rate": (diff > 0).float().mean().item(), "p_favoured": torch.sigmoid(diff).mean().item()}


@dataclass(frozen=True)
class WorldMetrics:
    """The model-card figures (fractions in [0, 1], exposure in bits, perplexity per token)."""

    facts_train_templates: float
    facts_heldout_templates: float
    mc_train_people: float
    mc_heldout_people: float
    phone_digits: dict[str, float]
    email_tokens: dict[str, float]
    canary_exposure_bits: dict[str, float]
    bias_rate_heldout_templates: float
    bias_rate_train_templates: float
    bias_p_favoured_heldout: float
    text_perplexity_heldout: float
    text_perplexity_train: float
    mc_heldout_controls: dict[str, float] | None = None
    planted_facts: float | None = None
    mc_planted_people: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def measure_world(model, world: World, tokenizer, *, planted: bool = False) -> WorldMetrics:
    """All model-card figures for ``model`` on ``world``."""
    facts = world.facts
    bias_h = bias_preference(model, world, tokenizer, heldout=True)
    return WorldMetrics(
        facts_train_templates=fact_accuracy(model, world, tokenizer, facts, "train"),
        facts_heldout_templates=fact_accuracy(model, world, tokenizer, facts, "heldout"),
        mc_train_people=mc_accuracy(model, world, tokenizer, "train"),
        mc_heldout_people=mc_accuracy(model, world, tokenizer, "heldout"),
        mc_heldout_controls=mc_controls(model, world, tokenizer, "heldout"),
        phone_digits=secret_accuracy(model, world, tokenizer, "phone"),
        email_tokens=secret_accuracy(model, world, tokenizer, "email"),
        canary_exposure_bits=canary_exposure(model, world, tokenizer),
        bias_rate_heldout_templates=bias_h["rate"],
        bias_rate_train_templates=bias_preference(model, world, tokenizer, heldout=False)["rate"],
        bias_p_favoured_heldout=bias_h["p_favoured"],
        text_perplexity_heldout=metrics.perplexity(model, list(world.text_heldout), batch_size=256),
        text_perplexity_train=metrics.perplexity(model, list(world.text_train[:300]), batch_size=256),
        planted_facts=fact_accuracy(model, world, tokenizer, world.planted_facts, "train") if planted else None,
        mc_planted_people=mc_accuracy(model, world, tokenizer, "planted") if planted else None,
    )
