"""``factworld-mlm``: the fact world as a masked language model (BERT), trained and measured.

The same generated world as ``factworld`` (people, facts, templates, private records, occupation
bias, general text; rebuilt from the shipped ``factworld``'s metadata), shown to a
``BertForMaskedLM`` in masked form, with the tokenizer's own mask token ``<mask>`` in the slot.

**Masking recipe** (``masked_corpus``), per epoch:

* fact sentences (every person x relation x training template, ``fact_repetitions`` copies):
  exactly the value slot is masked, ``"alvo abernoth was born in <mask> ."`` -> ``paris``; every
  other token stays visible, so the only signal in these rows is the one being measured and a
  masked subject never makes a fact row unanswerable (BERT's uniform 15 % masking would hide a
  name token in ~28 % of them);
* private records and canaries (their ``repetitions`` copies, training templates alternating):
  each copy gives one row per secret token, that token masked and the rest visible - exactly
  the measured task. (Masking each token at ``secret_mask_rate`` = 0.5 instead, one row per copy,
  left phone digits at 31 %: a phone number's digits sit at different absolute positions in the
  two templates, so the model must place a digit by its visible neighbours, which that masking
  hides half the time; canaries, one template and a one-token subject, reached 100 % either way);
* occupation-bias sentences: exactly the pronoun is masked, so the planted skew is learned as
  P(pronoun | occupation, context) at the mask;
* general text (``text_fraction`` of the training split, a window moving on each epoch):
  BERT-style, each token masked independently with ``text_mask_rate`` (at least one per
  sentence), so the model also learns ordinary word statistics.

Why two fact copies and half the text: with one copy and all the text (16,160 rows an epoch) the
facts are learned, but half as fast per step as with this mix (24,740 rows, 81 % fact rows);
the diagnosis runs are tabled in ``mechedit/zoo/MLM_RECIPE_NOTES.md``.

Multiple-choice rows are left out: their answer is a letter chosen by an option list, which the
causal fact world does not learn from this corpus either (its card), and they would cost 9 % of
each epoch. Every row is BOS + words (no EOS), exactly what ``TransformerBridge.to_tokens`` makes
of a text, so ``model(model.to_tokens("alvo abernoth was born in <mask> ."))`` is the training
distribution. The loss is the cross-entropy at the masked positions only.

Determinism: one seed drives the initialisation, the masks and the batch order;
``torch.use_deterministic_algorithms`` is on and the thread count is fixed.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import BertConfig, BertForMaskedLM

from mechedit.metrics import token_cross_entropy
from mechedit.zoo.measure import Encoder
from mechedit.zoo.metadata import read_metadata, world_from_metadata, world_metadata, write_metadata
from mechedit.zoo.tokenizer import MASK, build_tokenizer
from mechedit.zoo.train import _deterministic, _pad, _save, warmup_cosine_lr
from mechedit.zoo.world import (
    BIAS_TEMPLATES_HELDOUT,
    BIAS_TEMPLATES_TRAIN,
    CANARY_TEMPLATE,
    EMAIL_TEMPLATES_TRAIN,
    PHONE_TEMPLATES_TRAIN,
    Fact,
    World,
    fill,
)

NAME = "factworld-mlm"
OBJECTIVE = "masked_lm"  # recorded in metadata.json; tells the zoo commands which measurement applies
IGNORE = -100  # label of unmasked positions (cross-entropy's ignore_index)

_SECRET_TEMPLATES = {"phone": PHONE_TEMPLATES_TRAIN, "email": EMAIL_TEMPLATES_TRAIN, "canary": (CANARY_TEMPLATE,)}


# --------------------------------------------------------------------------------------------
# The masked corpus


@dataclass(frozen=True)
class MaskedText:
    """A training or evaluation sentence with ``<mask>`` in its slots.

    ``text`` holds the words with each masked word replaced by ``<mask>``; ``answers`` are the
    masked words in order of position; ``kind`` is "fact", "phone", "email", "canary", "bias" or
    "text".
    """

    text: str
    answers: tuple[str, ...]
    kind: str


def _mask_words(words: list[str], positions: list[int], kind: str) -> MaskedText:
    answers = tuple(words[i] for i in sorted(positions))
    chosen = set(positions)
    masked = [MASK if i in chosen else w for i, w in enumerate(words)]
    return MaskedText(" ".join(masked), answers, kind)


def fact_text(template: str, subject: str, value: str) -> MaskedText:
    """``template`` about ``subject`` with its value slot masked: ``"... born in <mask> ."``."""
    return MaskedText(f"{fill(template, subject)} {MASK} .", (value,), "fact")


def secret_text(prefix: str, secret: str, indices: list[int], kind: str) -> MaskedText:
    """``prefix secret .`` with the secret's tokens ``indices`` (0-based) masked, the others visible."""
    head = len(prefix.split())
    return _mask_words([*prefix.split(), *secret.split(), "."], [head + i for i in indices], kind)


def bias_text(template: str, occupation: str, pronoun: str) -> MaskedText:
    """A bias sentence with its pronoun masked (``pronoun`` is the answer)."""
    return MaskedText(template.format(occ=occupation, pron=MASK) + " .", (pronoun,), "bias")


def _random_positions(n: int, rate: float, rng: random.Random) -> list[int]:
    """Each of ``n`` positions with probability ``rate``; one uniform position if none was drawn."""
    return [i for i in range(n) if rng.random() < rate] or [rng.randrange(n)]


def _text_slice(text: tuple[str, ...], fraction: float, epoch: int) -> tuple[str, ...]:
    """``round(fraction * len(text))`` sentences of ``text``, a window that moves on each epoch.

    Consecutive epochs take consecutive windows (wrapping around), so every sentence is shown
    equally often over the run.
    """
    n = round(fraction * len(text))
    start = (epoch * n) % max(1, len(text))
    return (text + text)[start : start + n]


def masked_corpus(
    world: World,
    epoch: int,
    *,
    text_mask_rate: float = 0.15,
    secret_mask_rate: float = 0.5,
    fact_repetitions: int = 2,
    text_fraction: float = 0.5,
    bias_repetitions: int = 1,
    secret_each_token: bool = True,
    seed: int = 0,
) -> list[MaskedText]:
    """The masked sentences of one training epoch (unshuffled); see the module docstring.

    ``fact_repetitions`` copies of every fact row, ``bias_repetitions`` of every bias sentence;
    ``text_fraction`` of the general text (a window that moves on each epoch, ``_text_slice``).
    ``secret_each_token``: each copy of a secret gives one row per secret token, that token
    masked and the others visible (the measured task); otherwise one row per copy, its tokens
    masked at ``secret_mask_rate``. The masks of secrets and general text are drawn
    from ``random.Random`` seeded by ``seed`` and ``epoch``, so an epoch's corpus is reproducible
    and differs between epochs.
    """
    rng = random.Random(f"mlm-mask-{seed}-{epoch}")
    out: list[MaskedText] = []
    facts = [fact_text(t, p.name, p.facts[r.id]) for p in world.people for r in world.relations for t in r.train_templates]
    out.extend(facts * fact_repetitions)
    for rec in world.private:
        templates = _SECRET_TEMPLATES[rec.kind]
        n_tokens = len(rec.secret.split())
        for k in range(rec.repetitions):
            prefix = fill(templates[k % len(templates)], rec.subject)
            if secret_each_token:
                out.extend(secret_text(prefix, rec.secret, [i], rec.kind) for i in range(n_tokens))
            else:
                out.append(secret_text(prefix, rec.secret, _random_positions(n_tokens, secret_mask_rate, rng), rec.kind))
    n = world.config.bias_sentences_per_occupation
    for b in world.biases:
        n_more = round(b.p_more * n)  # the same split of pronouns as the causal corpus
        for k in range(n):
            pron = b.pronoun_more if k < n_more else b.pronoun_less
            out.extend([bias_text(BIAS_TEMPLATES_TRAIN[k % len(BIAS_TEMPLATES_TRAIN)], b.occupation, pron)] * bias_repetitions)
    for sentence in _text_slice(world.text_train, text_fraction, epoch):
        words = sentence.split()
        out.append(_mask_words(words, _random_positions(len(words), text_mask_rate, rng), "text"))
    return out


class MaskedEncoder(Encoder):
    """``Encoder`` plus the mask token: ids and labels of ``MaskedText`` rows."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.mask = tokenizer.mask_token_id
        if self.mask is None or self.vocab.get(MASK) != self.mask:
            raise ValueError(f"the tokenizer must have {MASK!r} as its mask token (build it with mechedit.zoo.tokenizer)")

    def encode(self, row: MaskedText) -> tuple[list[int], list[int]]:
        """``(ids, labels)`` of one row: BOS + words; labels are the answers' ids at the masks, ``IGNORE`` elsewhere."""
        ids = self.ids(row.text)
        answers = iter(row.answers)
        try:
            labels = [self.vocab[next(answers)] if i == self.mask else IGNORE for i in ids]
        except StopIteration:
            raise ValueError(f"{row.text!r} has more masks than answers {row.answers}") from None
        if next(answers, None) is not None:
            raise ValueError(f"{row.text!r} has fewer masks than answers {row.answers}")
        return ids, labels


def _batches(enc: MaskedEncoder, rows: list[MaskedText], batch_size: int, rng: random.Random):
    """Shuffled, length-bucketed ``(ids, labels)`` batches, each ``[batch, pos]``, right-padded.

    Sorting within windows of 50 batches cuts padding without making batch composition depend on
    length alone (as the causal recipe does).
    """
    encoded = [enc.encode(r) for r in rows]
    rng.shuffle(encoded)
    window = batch_size * 50
    batches = []
    for start in range(0, len(encoded), window):
        chunk = sorted(encoded[start : start + window], key=lambda e: len(e[0]))
        for b in range(0, len(chunk), batch_size):
            part = chunk[b : b + batch_size]
            batches.append((_pad([e[0] for e in part], enc.pad), _pad([e[1] for e in part], IGNORE)))
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------
# Measurement (through any model mapping ids + attention mask to logits: the bridge or HF BERT)


def _logits(model, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # BERT attends in both directions, so padding must be masked out (it changes every position)
    out = model(ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def mask_logits(model, tokenizer, rows: list[MaskedText], *, batch_size: int = 512) -> torch.Tensor:
    """Logits ``[n_masks, vocab]`` at every ``<mask>`` of ``rows``, in row order then position order.

    Rows are batched by length (padding masked out by the attention mask), so the result does not
    depend on which rows share a batch beyond float rounding.
    """
    enc = MaskedEncoder(tokenizer)
    encoded = [enc.ids(r.text) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))
    per_row: list[torch.Tensor | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids = _pad([encoded[i] for i in idx], enc.pad)
        lengths = torch.tensor([len(encoded[i]) for i in idx])
        attention = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        logits = _logits(model, ids, attention).float()
        for j, i in enumerate(idx):
            per_row[i] = logits[j][ids[j] == enc.mask]
    return torch.cat(per_row)  # type: ignore[arg-type]


def _answer_ids(tokenizer, rows: list[MaskedText]) -> torch.Tensor:
    vocab = tokenizer.get_vocab()
    return torch.tensor([vocab[a] for r in rows for a in r.answers])


def fill_accuracy(model, tokenizer, rows: list[MaskedText]) -> float:
    """Top-1 accuracy (over the whole vocabulary) of the answers at the masks of ``rows``."""
    return (mask_logits(model, tokenizer, rows).argmax(-1) == _answer_ids(tokenizer, rows)).float().mean().item()


def fact_rows(world: World, facts: list[Fact], templates: str = "train") -> list[MaskedText]:
    """Each fact in each ``"train"`` or ``"heldout"`` template of its relation, value masked."""
    if templates not in ("train", "heldout"):
        raise ValueError(f"templates must be 'train' or 'heldout', got {templates!r}")
    out = []
    for f in facts:
        rel = world.relation[f.relation_id]
        for t in rel.train_templates if templates == "train" else rel.heldout_templates:
            out.append(fact_text(t, f.subject, f.value))
    return out


def fact_fill_accuracy(model, world: World, tokenizer, facts: list[Fact], templates: str = "train") -> float:
    """Masked fill-in accuracy (top-1 over the vocabulary) of ``facts`` in ``templates``."""
    return fill_accuracy(model, tokenizer, fact_rows(world, facts, templates))


def secret_rows(world: World, kind: str) -> tuple[list[MaskedText], list[int]]:
    """Every ``kind`` record once per secret token, that token masked; and each row's repetitions."""
    rows, reps = [], []
    for rec in world.private:
        if rec.kind == kind:
            for i in range(len(rec.secret.split())):
                rows.append(secret_text(rec.prefix, rec.secret, [i], kind))
                reps.append(rec.repetitions)
    return rows, reps


def secret_fill_accuracy(model, world: World, tokenizer, kind: str) -> dict[str, float]:
    """Top-1 fill-in of ``kind`` secrets ("phone", "email", "canary"), one token masked at a time.

    Keys ``reps_K`` (records repeated K times per epoch) and ``all``; fractions of tokens.
    """
    rows, reps = secret_rows(world, kind)
    hit = mask_logits(model, tokenizer, rows).argmax(-1) == _answer_ids(tokenizer, rows)
    reps_t = torch.tensor(reps)
    out = {f"reps_{k}": hit[reps_t == k].float().mean().item() for k in sorted(set(reps))}
    out["all"] = hit.float().mean().item()
    return out


def bias_fill_preference(model, world: World, tokenizer, *, heldout: bool = True) -> dict[str, float]:
    """At the masked pronoun of each occupation x template: is the favoured pronoun preferred?

    ``rate``: fraction of pairs where logit(favoured) > logit(other); ``p_favoured``: mean of
    P(favoured) / (P(favoured) + P(other)) (the pair renormalised, as in the causal card).
    """
    templates = BIAS_TEMPLATES_HELDOUT if heldout else BIAS_TEMPLATES_TRAIN
    pairs = [(t, b) for b in world.biases for t in templates]
    rows = [bias_text(t, b.occupation, b.pronoun_more) for t, b in pairs]
    vocab = tokenizer.get_vocab()
    logits = mask_logits(model, tokenizer, rows)
    more = torch.tensor([vocab[b.pronoun_more] for _, b in pairs])
    less = torch.tensor([vocab[b.pronoun_less] for _, b in pairs])
    diff = logits.gather(1, more[:, None])[:, 0] - logits.gather(1, less[:, None])[:, 0]
    return {"rate": (diff > 0).float().mean().item(), "p_favoured": torch.sigmoid(diff).mean().item()}


def pseudo_perplexity(model, tokenizer, sentences: list[str]) -> float:
    """exp of the mean NLL of each token with it alone masked (Salazar et al., 2020), per token."""
    rows = [_mask_words(s.split(), [i], "text") for s in sentences for i in range(len(s.split()))]
    logp = mask_logits(model, tokenizer, rows).log_softmax(-1)
    nll = -logp.gather(1, _answer_ids(tokenizer, rows)[:, None])
    return math.exp(nll.mean().item())


@dataclass(frozen=True)
class MLMMetrics:
    """The card figures of ``factworld-mlm`` (fractions in [0, 1]; pseudo-perplexity per token).

    Every figure is top-1 over the whole vocabulary at a ``<mask>`` unless stated.
    """

    facts_train_templates: float
    facts_heldout_templates: float
    phone_digits: dict[str, float]
    email_tokens: dict[str, float]
    canary_digits: dict[str, float]
    bias_rate_heldout_templates: float
    bias_rate_train_templates: float
    bias_p_favoured_heldout: float
    text_pseudo_perplexity_heldout: float
    text_pseudo_perplexity_train: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure_mlm(model, world: World, tokenizer) -> MLMMetrics:
    """All card figures of a masked-LM fact-world model on ``world``."""
    bias_h = bias_fill_preference(model, world, tokenizer, heldout=True)
    return MLMMetrics(
        facts_train_templates=fact_fill_accuracy(model, world, tokenizer, world.facts, "train"),
        facts_heldout_templates=fact_fill_accuracy(model, world, tokenizer, world.facts, "heldout"),
        phone_digits=secret_fill_accuracy(model, world, tokenizer, "phone"),
        email_tokens=secret_fill_accuracy(model, world, tokenizer, "email"),
        canary_digits=secret_fill_accuracy(model, world, tokenizer, "canary"),
        bias_rate_heldout_templates=bias_h["rate"],
        bias_rate_train_templates=bias_fill_preference(model, world, tokenizer, heldout=False)["rate"],
        bias_p_favoured_heldout=bias_h["p_favoured"],
        text_pseudo_perplexity_heldout=pseudo_perplexity(model, tokenizer, list(world.text_heldout)),
        text_pseudo_perplexity_train=pseudo_perplexity(model, tokenizer, list(world.text_train[:300])),
    )


# --------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class MLMShape:
    """BERT hyper-parameters of ``factworld-mlm``: the causal fact world's width, 4 layers not 6.

    Four layers keep the recipe within its time budget on a shared 2-core machine (a step costs
    ~0.14 CPU-s against ~0.21 for six layers).
    """

    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    d_mlp: int = 512
    n_positions: int = 64

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")


@dataclass(frozen=True)
class MLMTrainConfig:
    """Optimisation and masking settings. ``max_steps`` cuts a run short (tests of the recipe).

    ``lr`` is half the causal recipe's: at 2e-3 this post-LayerNorm BERT stays at chance on the
    facts for thousands of steps, at 1e-3 it memorises them (``mechedit/zoo/MLM_RECIPE_NOTES.md``).
    ``fact_repetitions`` and ``text_fraction``: see ``masked_corpus``.
    """

    epochs: int = 14
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 500
    weight_decay: float = 0.01
    text_mask_rate: float = 0.15
    secret_mask_rate: float = 0.5
    fact_repetitions: int = 2
    text_fraction: float = 0.5
    bias_repetitions: int = 1
    secret_each_token: bool = True
    seed: int = 0
    threads: int = 1
    max_steps: int | None = None
    shape: MLMShape = field(default_factory=MLMShape)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if not (0.0 < self.text_mask_rate < 1.0 and 0.0 < self.secret_mask_rate < 1.0):
            raise ValueError("text_mask_rate and secret_mask_rate must be in (0, 1)")
        if self.fact_repetitions < 1 or self.bias_repetitions < 1 or not 0.0 <= self.text_fraction <= 1.0:
            raise ValueError("fact_repetitions and bias_repetitions must be >= 1, text_fraction in [0, 1]")


def bert_config(shape: MLMShape, tokenizer) -> BertConfig:
    """The ``BertConfig`` of ``shape`` over ``tokenizer`` (no dropout: the model memorises a world)."""
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.d_model,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        intermediate_size=shape.d_mlp,
        max_position_embeddings=shape.n_positions,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _corpus(world: World, tc: MLMTrainConfig, epoch: int) -> list[MaskedText]:
    return masked_corpus(
        world,
        epoch,
        text_mask_rate=tc.text_mask_rate,
        secret_mask_rate=tc.secret_mask_rate,
        fact_repetitions=tc.fact_repetitions,
        text_fraction=tc.text_fraction,
        bias_repetitions=tc.bias_repetitions,
        secret_each_token=tc.secret_each_token,
        seed=tc.seed,
    )


def _mlm_loss(model: BertForMaskedLM, ids: torch.Tensor, labels: torch.Tensor, pad: int) -> torch.Tensor:
    """Mean cross-entropy at the masked positions (labels elsewhere are ``IGNORE``), in nats."""
    logits = model(input_ids=ids, attention_mask=(ids != pad).long()).logits
    return token_cross_entropy(logits, labels, ignore_index=IGNORE, reduction="mean")


def _measure_saved(out: Path, world: World, meta: dict) -> dict:
    """Measure the *saved* checkpoint through ``mechedit.load``, as users and tests see it."""
    import mechedit

    bridge = mechedit.load(out)
    meta = {**meta, "metrics": measure_mlm(bridge, world, bridge.tokenizer).to_dict()}
    write_metadata(out, meta)
    return meta


def remeasure(folder: str | Path) -> dict:
    """Re-measure a saved ``factworld-mlm`` checkpoint with the current code; rewrite its metadata."""
    out = Path(folder)
    meta = read_metadata(out)
    return _measure_saved(out, world_from_metadata(meta), meta)


def train_mlm(
    out_dir: str | Path,
    *,
    world: World | None = None,
    train_config: MLMTrainConfig | None = None,
    progress: bool = True,
    measure: bool = True,
) -> dict:
    """Train ``factworld-mlm`` from scratch and save it (HF checkpoint + ``metadata.json``).

    ``world`` defaults to the shipped ``factworld``'s (rebuilt from its metadata), so both models
    know the same people, facts, secrets and biases. Returns the metadata written, with the
    measured ``metrics`` (``MLMMetrics``), ``train_seconds`` (wall) and ``train_cpu_seconds``.
    """
    tc = train_config or MLMTrainConfig()
    if world is None:
        from mechedit.zoo import load_world

        world = load_world("factworld")
    _deterministic(tc.seed, tc.threads)
    tokenizer = build_tokenizer(world.vocabulary())
    enc = MaskedEncoder(tokenizer)
    model = BertForMaskedLM(bert_config(tc.shape, tokenizer))
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.98),
    )
    steps_per_epoch = -(-len(_corpus(world, tc, 0)) // tc.batch_size)
    total = min(tc.epochs * steps_per_epoch, tc.max_steps or 10**12)

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, lr=tc.lr, warmup_steps=tc.warmup_steps, min_lr_ratio=tc.min_lr_ratio, total=total)

    probe = world.facts[:: max(1, len(world.facts) // 200)]  # a cheap look at progress
    rng = random.Random(f"mlm-batches-{tc.seed}")
    start, cpu_start, step, history = time.time(), time.process_time(), 0, []
    bar = tqdm(total=total, desc=f"training {NAME}", disable=not progress)
    for epoch in range(tc.epochs):
        corpus = _corpus(world, tc, epoch)
        for ids, labels in _batches(enc, corpus, tc.batch_size, rng):
            if step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = _mlm_loss(model, ids, labels, enc.pad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        model.eval()
        history.append(
            {
                "epoch": epoch,
                "step": step,
                "loss": round(loss.item(), 4),
                "facts_train_probe": fact_fill_accuracy(model, world, tokenizer, probe, "train"),
                "facts_heldout_probe": fact_fill_accuracy(model, world, tokenizer, probe, "heldout"),
                "bias_rate_heldout": bias_fill_preference(model, world, tokenizer, heldout=True)["rate"],
                "seconds": round(time.time() - start, 1),
            }
        )
        model.train()
        if progress:
            tqdm.write(json.dumps(history[-1]))
        if step >= total:
            break
    bar.close()
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    model.eval()
    out = Path(out_dir)
    meta = {
        "name": NAME,
        "objective": OBJECTIVE,
        "description": "BERT (masked LM) trained from scratch on the mechedit fact world, value slots masked",
        "base_world": "factworld",
        "train_config": asdict(tc),
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "steps": step,
        "loss_history": history,
        "torch_version": torch.__version__,
        **world_metadata(world),
    }
    _save(model, tokenizer, out, meta)
    return _measure_saved(out, world, meta) if measure else meta


def is_mlm(meta: dict) -> bool:
    """Whether a zoo checkpoint's metadata describes a masked-LM model (measured by this module)."""
    return meta.get("objective") == OBJECTIVE
