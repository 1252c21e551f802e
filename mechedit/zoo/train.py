"""The training recipes of the fact-world checkpoints: deterministic, CPU-only, one command each.

``train_factworld`` trains a small GPT-2 from scratch on ``World.training_sentences``;
``plant_facts`` starts from that checkpoint and teaches the planted people's facts while only one
layer's MLP may change (replaying the old corpus so old facts stay), which gives later localisation
methods a known answer: the facts live in that layer.

Determinism: one seed drives the world, the initialisation and the batch order;
``torch.use_deterministic_algorithms`` is on and the thread count is fixed (results are
bit-identical for the same seed *and* thread count on the same machine and torch build).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mechedit.metrics import next_token_labels, token_cross_entropy
from mechedit.zoo.measure import Encoder, fact_accuracy, measure_world
from mechedit.zoo.metadata import read_metadata, world_from_metadata, world_metadata, write_metadata
from mechedit.zoo.tokenizer import build_tokenizer, save_tokenizer
from mechedit.zoo.world import MC_LETTERS, World, WorldConfig, load_occupations


@dataclass(frozen=True)
class ModelShape:
    """GPT-2 hyper-parameters of the fact-world model."""

    n_layer: int = 6
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512
    n_positions: int = 64

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``max_steps`` cuts a run short (for quick tests of the recipe).

    The defaults are the shipped ``factworld`` recipe (attempt P of ``MC_ATTEMPTS.md``): packed
    rows, lookup drills and the logit-lens loss at block 4 together are what make multiple-choice
    questions answerable from the stored facts; each alone, or fewer epochs, left MC near chance.

    Induction data (off by default): ``warmup_induction_steps`` steps on induction rows only (a
    random word sequence followed by itself, see ``induction_sentences``) before the world's
    corpus, and ``induction_fraction`` of every epoch's rows being induction rows;
    ``induction_length`` bounds the repeated sequence's length. The learning-rate schedule spans
    warm-up and epochs together. ``lookup_drill_fraction`` of every epoch's rows are lookup drills
    (``lookup_drills``: four lettered options, then one of the values named, then the letter), the
    matching half of a multiple-choice answer without recall.

    Logit-lens supervision: with ``lens_layer`` set, the loss adds ``lens_weight`` times the
    next-token loss read off the residual stream before block ``lens_layer`` through the final
    LayerNorm and the unembedding, on every target but the MC letters, so a recalled value is
    readable mid-depth and the blocks after it are free to match it against the options.

    ``pack``: each training row holds as many of the epoch's shuffled sentences, one after another
    (no separator), as fit in ``n_positions`` (BOS first, EOS last); ``batch_size`` then counts packed
    rows. Without it every sentence is its own row and starts right after BOS, and the model
    learns to recall a fact only there (measured on the factworld of 2267da0, trained unpacked: one
    random word before a fact prompt drops recall from 100 % to 63 %, four MC options before it to 7 %).

    ``threads``: results are bit-identical per thread count; the shipped checkpoint used 2.
    """

    epochs: int = 50
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    max_steps: int | None = None
    shape: ModelShape = field(default_factory=ModelShape)
    warmup_induction_steps: int = 0
    induction_fraction: float = 0.0
    induction_length: tuple[int, int] = (5, 15)
    lookup_drill_fraction: float = 0.2
    lens_layer: int | None = 4
    lens_weight: float = 1.0
    pack: bool = True

    def __post_init__(self) -> None:
        if self.lens_layer is not None and not 1 <= self.lens_layer < self.shape.n_layer:
            raise ValueError(
                f"lens_layer must be in [1, n_layer) = [1, {self.shape.n_layer}), not {self.lens_layer} "
                "(None switches the logit-lens loss off, as a model this shallow needs)"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.warmup_induction_steps < 0:
            raise ValueError("warmup_induction_steps must be >= 0")
        if not 0.0 <= self.induction_fraction < 1.0:
            raise ValueError("induction_fraction must be in [0, 1)")
        if not 0.0 <= self.lookup_drill_fraction < 1.0 or self.induction_fraction + self.lookup_drill_fraction >= 1.0:
            raise ValueError("lookup_drill_fraction must be in [0, 1), and below 1 with induction_fraction")
        lo, hi = self.induction_length
        if not 1 <= lo <= hi or 2 * hi + 2 > self.shape.n_positions:
            raise ValueError(
                f"induction_length {self.induction_length}: need 1 <= min <= max and 2 * max + 2 (BOS, EOS) "
                f"<= n_positions ({self.shape.n_positions})"
            )

    @property
    def uses_induction(self) -> bool:
        return self.warmup_induction_steps > 0 or self.induction_fraction > 0


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Right-padded ``[len(rows), longest]`` ids."""
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids


PLANT_MODES = ("all", "subject")
LR_SCHEDULES = ("constant", "cosine")
# Subject mode learns slowly: in factworld the final token reads the person through layer-0
# attention and later heads read mostly the first name, so what the name-token MLP writes must
# reach the answer through them. Layer 1 leaves four attention layers to carry it. Measured on the
# shipped factworld (planted facts / old facts, training templates): 48 planted rows per batch of
# 64 reach 98.6 % by step 2,400 but the old facts fall to 69 %; letting the trained MLP act at every
# position of the replay rows (replay_everywhere) keeps more of them, and 32 planted rows keep more
# still: 99.3 % / 89.0 % at step 4,000 (MODEL_CARD.md lists every attempt).
MODE_DEFAULTS: dict[str, dict] = {
    "all": {},
    "subject": {
        "layer": 1, "lr": 1e-2, "planted_per_batch": 32, "lr_schedule": "cosine", "max_steps": 4000,
        "replay_everywhere": True, "eval_every": 100,
    },
}


@dataclass(frozen=True)
class PlantConfig:
    """Settings of the planting run: which layer's MLP learns the new facts, where, and how.

    ``at``: ``"all"`` trains ``blocks.{layer}.mlp`` at every position (``factworld-planted``);
    ``"subject"`` lets the trainable MLP act only at the tokens of a person's name and the frozen
    original MLP everywhere else (``factworld-planted-subject``), so the new facts can only be
    stored as subject enrichment. ``consistency_weight`` (subject mode only) weighs the mean over
    non-subject positions of ||new(x) - old(x)||^2 (summed over d_model), which keeps the trained
    MLP - the one exported, and run at every position - close to the original where it must not act.
    ``subject_names`` (subject mode): where the trainable MLP acts - ``"everyone"``, every
    person's name; ``"planted"``, the planted people's names only, with the consistency loss at
    every other position, old people's names included (measured: the planted facts then stay at
    4 % through 1,100 steps - the MLP must tell new first + last name combinations from old ones
    sharing their tokens - while ``"everyone"`` reaches 98.6 % but old facts fall to 69 %).
    ``replay_everywhere`` (subject mode): in the replay rows (the old corpus) the trainable MLP
    acts at every position, so the LM loss keeps the exported model's old behaviour directly,
    while in the planted rows it still acts at the name tokens only (measured: old facts 69 % ->
    83 % at planted 100 %, and the planted facts learned in 850 steps instead of 2,000).
    ``last_token_only`` (subject mode): the trainable MLP acts at the name's last token only
    (measured: the planted facts stay at 4-6 % through 3,000 steps - this base model's later heads
    read the person from the first name's position, see the model card).
    ``namesake_replay``: the share of each batch's replay rows drawn from the facts of old people
    who share a first name with a planted person (the people a first-name-token MLP confuses with
    the planted ones), the rest from the old corpus as usual.
    ``lr_schedule``: ``"constant"`` or ``"cosine"`` (from ``lr`` down to ``min_lr_ratio * lr`` at
    ``max_steps``). ``for_mode`` gives each mode's shipped recipe (``MODE_DEFAULTS``).
    """

    layer: int = 2
    at: str = "all"
    max_steps: int = 1500
    batch_size: int = 64
    planted_per_batch: int = 16
    lr: float = 1e-3
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    subject_names: str = "everyone"
    replay_everywhere: bool = False
    last_token_only: bool = False
    consistency_weight: float = 1.0
    namesake_replay: float = 0.0
    eval_every: int = 50
    target_planted: float = 0.98
    max_old_drop: float = 0.02
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.planted_per_batch < self.batch_size:
            raise ValueError("planted_per_batch must be between 1 and batch_size - 1")
        if self.at not in PLANT_MODES:
            raise ValueError(f"at={self.at!r}: choose one of {', '.join(PLANT_MODES)}")
        if self.consistency_weight < 0:
            raise ValueError("consistency_weight must be >= 0")
        if self.subject_names not in ("planted", "everyone"):
            raise ValueError(f"subject_names={self.subject_names!r}: choose 'planted' or 'everyone'")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be between 0 and 1")
        if not 0 <= self.namesake_replay <= 1:
            raise ValueError("namesake_replay must be between 0 and 1")

    @classmethod
    def for_mode(cls, at: str = "all", **overrides) -> PlantConfig:
        """The recipe of the shipped model planted ``at`` (``MODE_DEFAULTS``), with ``overrides``."""
        if at not in PLANT_MODES:
            raise ValueError(f"at={at!r}: choose one of {', '.join(PLANT_MODES)}")
        return cls(**{"at": at, **MODE_DEFAULTS[at], **overrides})

    @property
    def name(self) -> str:
        """The zoo name of the model this configuration plants."""
        return "factworld-planted" if self.at == "all" else "factworld-planted-subject"


def warmup_cosine_lr(step: int, *, lr: float, warmup_steps: int, min_lr_ratio: float, total: int) -> float:
    """Learning rate at ``step``: linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``total``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + torch.cos(torch.tensor(frac * torch.pi)).item()))


def _deterministic(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _packed(enc: Encoder, sentences: list[str], width: int, rng: random.Random) -> list[list[int]]:
    """The sentences shuffled and laid end to end in rows of at most ``width`` ids (BOS ... EOS)."""
    order = [enc.ids(s)[1:] for s in sentences]
    rng.shuffle(order)
    rows, row = [], [enc.bos]
    for ids in order:
        if len(row) + len(ids) + 1 > width and len(row) > 1:
            rows.append(row + [enc.eos])
            row = [enc.bos]
        row += ids[: width - 2]
    return rows + [row + [enc.eos]]


def _batches(enc: Encoder, sentences: list[str], batch_size: int, rng: random.Random, *, pack: int = 0) -> list[torch.Tensor]:
    """Shuffled, length-bucketed batches of ids ``[batch, pos]`` (BOS ... EOS, right-padded).

    Sorting within windows of 50 batches cuts padding roughly in half without making batch
    composition depend on length alone. ``pack`` > 0: rows of sentences laid end to end, at
    most ``pack`` ids each (``_packed``).
    """
    rows = _packed(enc, sentences, pack, rng) if pack else [enc.ids(s) + [enc.eos] for s in sentences]
    rng.shuffle(rows)
    window = batch_size * 50
    batches = []
    for start in range(0, len(rows), window):
        chunk = sorted(rows[start : start + window], key=len)
        batches.extend(_pad(chunk[b : b + batch_size], enc.pad) for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def induction_sentences(words: list[str], n: int, rng: random.Random, *, length: tuple[int, int] = (5, 15)) -> list[str]:
    """``n`` induction rows: ``length``-bounded random sequences of ``words``, each followed by itself.

    Every token of the second copy after its first is predictable only by finding the previous
    occurrence of the current token and copying its successor (an induction head), which dense
    rows like these teach a small attention model within a few thousand steps.
    """
    rows = []
    for _ in range(n):
        seq = rng.choices(words, k=rng.randint(*length))
        rows.append(" ".join(seq + seq))
    return rows


def lookup_drills(world: World, n: int, rng: random.Random) -> list[str]:
    """``n`` rows ``q : A v1 B v2 C v3 D v4 . v answer : L``: the letter ``L`` of the named value ``v``.

    Options are four values of one relation drawn from ``rng``; no person is involved, so the rows
    teach only to find a value among the options and copy the letter before it. In a world whose
    ``mc_layout`` is ``"letter-after"`` the rows are ``q : v1 A v2 B v3 C v4 D . v L``: the letter
    follows the named value, one induction step.
    """
    from mechedit.zoo.world import MC_LETTERS

    rows = []
    for _ in range(n):
        options = rng.sample(rng.choice(world.relations).values, len(MC_LETTERS))
        k = rng.randrange(len(MC_LETTERS))
        # letter-after: the value, then its letter - one induction step
        ask = "" if world.config.mc_layout == "letter-after" else " answer :"
        rows.append(f"q : {world.mc_options(options)} . {options[k]}{ask} {MC_LETTERS[k]}")
    return rows


@torch.no_grad()
def induction_accuracy(model, tokenizer, words: list[str], *, n: int = 200, length: tuple[int, int] = (5, 15), seed: int = 12345) -> float:
    """Top-1 accuracy of the model on the copyable tokens of fresh induction rows (fraction in [0, 1]).

    Scored tokens: the second copy's tokens after its first (the first cannot be known: the
    sequence's length is random). Chance is ~1 / vocabulary size.
    """
    enc = Encoder(tokenizer)
    rows = induction_sentences(words, n, random.Random(seed), length=length)
    ids, lengths = enc.batch(rows)
    pred = _logits_of(model, ids).argmax(-1)  # [n, pos]
    half = (lengths - 1) // 2  # sequence length L; BOS at 0, copy 1 at 1..L, copy 2 at L+1..2L
    pos = torch.arange(ids.shape[1])
    # the prediction at position p is for token p + 1; score targets L+2..2L
    scored = (pos[None] >= half[:, None] + 1) & (pos[None] <= 2 * half[:, None] - 1)
    right = pred[:, :-1] == ids[:, 1:]
    return (right & scored[:, :-1]).sum().item() / scored[:, :-1].sum().item()


def _logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _lm_loss(model: GPT2LMHeadModel, ids: torch.Tensor, pad: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a right-padded batch (nats)."""
    labels = next_token_labels(ids, ids != pad)
    return token_cross_entropy(model(ids).logits[:, :-1], labels, reduction="mean")


def _lm_and_lens_loss(model: GPT2LMHeadModel, ids: torch.Tensor, pad: int, layer: int, weight: float, skip: torch.Tensor) -> torch.Tensor:
    """``_lm_loss`` plus ``weight`` x the same loss through the logit lens at the residual stream
    before block ``layer``, targets in ``skip`` (token ids) left out of the lens term (nats)."""
    labels = next_token_labels(ids, ids != pad)
    out = model(ids, output_hidden_states=True)
    lm = token_cross_entropy(out.logits[:, :-1], labels, reduction="mean")
    lens_labels = labels.masked_fill(torch.isin(labels, skip), -100)
    lens_logits = model.lm_head(model.transformer.ln_f(out.hidden_states[layer]))
    return lm + weight * token_cross_entropy(lens_logits[:, :-1], lens_labels, reduction="mean")


def _save(model, tokenizer, out: Path, metadata: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out)
    write_metadata(out, metadata)


def _measure_saved(out: Path, world: World, meta: dict, *, planted: bool = False) -> dict:
    """Measure the *saved* checkpoint through ``mechedit.load``, exactly as users and tests see it."""
    import mechedit

    bridge = mechedit.load(out)
    meta = {**meta, "metrics": measure_world(bridge, world, bridge.tokenizer, planted=planted).to_dict()}
    write_metadata(out, meta)
    return meta


def remeasure(folder: str | Path) -> dict:
    """Re-measure a saved checkpoint's figures with the current code and rewrite its metadata."""
    out = Path(folder)
    meta = read_metadata(out)
    return _measure_saved(out, world_from_metadata(meta), meta, planted="planted_layer" in meta)


def train_factworld(
    out_dir: str | Path,
    *,
    world_config: WorldConfig | None = None,
    train_config: TrainConfig | None = None,
    occupations: list[tuple[str, float]] | None = None,
    progress: bool = True,
    measure: bool = True,
    on_epoch: Callable[[GPT2LMHeadModel, World, PreTrainedTokenizerFast, dict], bool] | None = None,
) -> dict:
    """Train the fact-world model from scratch and save it (HF checkpoint + ``metadata.json``).

    Returns the metadata written, including the measured ``metrics`` (see ``measure_world``) and
    ``train_seconds``. ``occupations`` defaults to WinoGender's list (``world.load_occupations()``).
    ``on_epoch(model, world, tokenizer, entry)`` (for experiments) runs after each epoch's
    progress probe, the model in eval mode; it may add figures to ``entry`` (the epoch's
    ``loss_history`` row) and returns True to stop training there.
    """
    tc = train_config or TrainConfig()
    if occupations is None:
        occupations = load_occupations()
    world = World.generate(world_config or WorldConfig(seed=tc.seed), occupations=occupations)
    _deterministic(tc.seed, tc.threads)
    tokenizer = build_tokenizer(world.vocabulary())
    enc = Encoder(tokenizer)
    s = tc.shape
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=s.n_positions,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head,
        n_inner=s.n_inner,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.98),
    )
    words = world.vocabulary()
    ind_rng = random.Random(f"induction-{tc.seed}")  # only drawn from when induction is on

    extra = tc.induction_fraction + tc.lookup_drill_fraction

    def n_extra(n_corpus: int, fraction: float) -> int:
        return round(n_corpus * fraction / (1 - extra))

    def epoch_sentences(epoch: int) -> list[str]:
        sentences = world.training_sentences(epoch)
        n_corpus = len(sentences)
        if tc.induction_fraction:
            sentences = sentences + induction_sentences(words, n_extra(n_corpus, tc.induction_fraction), ind_rng, length=tc.induction_length)
        if tc.lookup_drill_fraction:
            sentences = sentences + lookup_drills(world, n_extra(n_corpus, tc.lookup_drill_fraction), ind_rng)
        return sentences

    n_corpus = len(world.training_sentences(0))
    n_rows = n_corpus + sum(n_extra(n_corpus, f) for f in (tc.induction_fraction, tc.lookup_drill_fraction) if f)
    pack = s.n_positions if tc.pack else 0
    if pack:  # the schedule's length from epoch 0's packing (later epochs pack to within a row or two)
        n_rows = len(_packed(enc, epoch_sentences(0), pack, random.Random(0)))
    steps_per_epoch = -(-n_rows // tc.batch_size)
    total = min(tc.warmup_induction_steps + tc.epochs * steps_per_epoch, tc.max_steps or 10**12)

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, lr=tc.lr, warmup_steps=tc.warmup_steps, min_lr_ratio=tc.min_lr_ratio, total=total)

    rng = random.Random(f"batches-{tc.seed}")
    letters = torch.tensor([enc.vocab[x] for x in MC_LETTERS]) if tc.lens_layer is not None else None
    start, step, history = time.time(), 0, []
    bar = tqdm(total=total, desc="training factworld", disable=not progress)

    def train_step(ids: torch.Tensor) -> torch.Tensor:
        nonlocal step
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if tc.lens_layer is None:
            loss = _lm_loss(model, ids, enc.pad)
        else:
            loss = _lm_and_lens_loss(model, ids, enc.pad, tc.lens_layer, tc.lens_weight, letters)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        return loss

    warm = min(tc.warmup_induction_steps, total)
    if warm:
        rows = induction_sentences(words, warm * tc.batch_size, ind_rng, length=tc.induction_length)
        for ids in _batches(enc, rows, tc.batch_size, ind_rng):
            loss = train_step(ids)
            bar.set_postfix(phase="induction", loss=f"{loss.item():.3f}")
        model.eval()
        history.append({"epoch": -1, "step": step, "loss": round(loss.item(), 4), "induction": induction_accuracy(model, tokenizer, words, length=tc.induction_length)})
        model.train()
        if progress:
            tqdm.write(json.dumps(history[-1]))
    for epoch in range(tc.epochs):
        if step >= total:
            break
        for ids in _batches(enc, epoch_sentences(epoch), tc.batch_size, rng, pack=pack):
            if step >= total:
                break
            loss = train_step(ids)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        model.eval()
        probe = world.facts[:: max(1, len(world.facts) // 200)]  # a cheap look at progress
        history.append(
            {
                "epoch": epoch,
                "step": step,
                "loss": round(loss.item(), 4),
                "facts_train_probe": fact_accuracy(model, world, tokenizer, probe, "train"),
                "facts_heldout_probe": fact_accuracy(model, world, tokenizer, probe, "heldout"),
            }
        )
        if tc.uses_induction:
            history[-1]["induction"] = induction_accuracy(model, tokenizer, words, length=tc.induction_length)
        stop = bool(on_epoch(model, world, tokenizer, history[-1])) if on_epoch else False
        model.train()
        if progress:
            tqdm.write(json.dumps(history[-1]))
        if step >= total or stop:
            break
    bar.close()
    seconds = time.time() - start
    model.eval()
    meta = {
        "name": "factworld",
        "description": "GPT-2 trained from scratch on the mechedit fact world",
        "train_config": asdict(tc),
        "train_seconds": round(seconds, 1),
        "steps": step,
        "loss_history": history,
        "torch_version": torch.__version__,
        **world_metadata(world),
    }
    _save(model, tokenizer, Path(out_dir), meta)
    return _measure_saved(Path(out_dir), world, meta) if measure else meta


def _mlp_parameters(model: GPT2LMHeadModel, layer: int) -> dict[str, torch.nn.Parameter]:
    """The parameters of block ``layer``'s MLP (whole tensors; its norm excluded), by HF name."""
    from mechedit.components import Component
    from mechedit.hf import circuit_parameters

    params = dict(model.named_parameters())
    return {name: params[name] for name in circuit_parameters(model, [Component("mlp", layer)])}


def _name_pairs(world: World, enc: Encoder, *, planted_only: bool = False) -> torch.Tensor:
    """``[vocab, vocab]`` bool: True at (first-name id, last-name id) of every person, trained or
    planted (only the planted people with ``planted_only``)."""
    pairs = torch.zeros(len(enc.vocab), len(enc.vocab), dtype=torch.bool)
    for person in world.planted if planted_only else (*world.people, *world.planted):
        pairs[enc.vocab[person.first], enc.vocab[person.last]] = True
    return pairs


def subject_mask(ids: torch.Tensor, name_pairs: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
    """``[batch, pos]`` bool: the positions of every person's name in ids ``[batch, pos]``.

    A name is a first-name token directly followed by a last-name token that together make a
    person of the world (``name_pairs``, see ``_name_pairs``), wherever the template puts it; both
    tokens are marked. Names occur in fact sentences, MC questions and private records; canary
    code names, occupations and general text have none.
    """
    starts = name_pairs[ids[:, :-1], ids[:, 1:]]  # [batch, pos - 1]: a name starts here
    mask = torch.zeros_like(ids, dtype=torch.bool)
    if not last_only:
        mask[:, :-1] |= starts
    mask[:, 1:] |= starts
    return mask


class _SubjectOnlyMLP:
    """A forward hook on the trainable MLP for subject-mode planting.

    While ``mask`` (``[batch, pos]`` bool, the name tokens) is set, the block's output is the
    trainable MLP's at the masked positions and the frozen original's elsewhere, so the LM loss
    can only reach the trainable MLP through the subject's tokens; ``consistency`` then holds the
    mean over ``keep`` positions (the unmasked, unpadded ones) of ||new(x) - old(x)||^2 summed over
    d_model, with no gradient into the original. With ``mask`` None the hook does nothing: the
    model is then exactly the one exported (trained MLP at every position), which is what the
    planting run evaluates.
    """

    def __init__(self, mlp: torch.nn.Module):
        self.frozen = copy.deepcopy(mlp).requires_grad_(False)
        self.mask: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.consistency = torch.zeros(())
        self.handle = mlp.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if self.mask is None:
            return None
        with torch.no_grad():
            old = self.frozen(inputs[0])
        self.consistency = (output - old).pow(2).sum(-1)[self.keep].mean()
        m = self.mask[..., None].to(output.dtype)
        return m * output + (1 - m) * old


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant_facts(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    config: PlantConfig | None = None,
    progress: bool = True,
    measure: bool = True,
) -> dict:
    """Teach the planted people's facts to ``base_dir``'s model by training one MLP only.

    Every batch mixes ``planted_per_batch`` planted sentences with old-corpus sentences (replay),
    so the old facts are kept. Stops as soon as planted accuracy reaches ``target_planted`` with
    old-fact accuracy within ``max_old_drop`` of the base model's, or at ``max_steps``. Only
    ``transformer.h.{layer}.mlp.*`` receives gradients; every other tensor is saved unchanged.
    With ``config.at == "subject"`` the trained MLP acts only at name tokens during training (see
    ``PlantConfig``); the accuracies that stop the run are always those of the model as saved.

    With ``measure`` the saved checkpoint is measured through ``mechedit.load`` (the card's
    figures) and the ground-truth patching grid (``mechedit.zoo.ground_truth``) is recorded in its
    metadata. Returns the metadata written.
    """
    pc = config or PlantConfig()
    base = Path(base_dir)
    base_meta = read_metadata(base)
    world = world_from_metadata(base_meta)
    _deterministic(pc.seed, pc.threads)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(base))
    enc = Encoder(tokenizer)
    model = GPT2LMHeadModel.from_pretrained(str(base))
    if not 0 <= pc.layer < model.config.n_layer:
        raise ValueError(f"layer {pc.layer} out of range: the model has {model.config.n_layer} layers")
    trainable = _mlp_parameters(model, pc.layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(trainable.values()), lr=pc.lr, weight_decay=0.0)

    model.eval()
    mixer = _SubjectOnlyMLP(model.transformer.h[pc.layer].mlp) if pc.at == "subject" else None
    name_pairs = _name_pairs(world, enc, planted_only=pc.subject_names == "planted")
    old_before = fact_accuracy(model, world, tokenizer, world.facts, "train")
    planted_rows = [enc.ids(s) + [enc.eos] for s in world.planting_sentences()]
    rng = random.Random(f"plant-{pc.seed}")
    replay: list[str] = []
    n_old = pc.batch_size - pc.planted_per_batch
    n_namesake = round(n_old * pc.namesake_replay)
    if n_namesake:
        namesake_rows = [enc.ids(s) + [enc.eos] for s in world.namesake_sentences()]
        namesake_rng = random.Random(f"namesakes-{pc.seed}")
    start, step, log = time.time(), 0, []
    where = "at name tokens" if mixer else "at every position"
    bar = tqdm(total=pc.max_steps, desc=f"planting facts in blocks.{pc.layer}.mlp {where}", disable=not progress)
    while step < pc.max_steps:
        if pc.lr_schedule == "cosine":  # decays over max_steps; the run may stop earlier
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(step + 1, lr=pc.lr, warmup_steps=0, min_lr_ratio=pc.min_lr_ratio, total=pc.max_steps)
        if len(replay) < pc.batch_size:
            replay.extend(world.training_sentences(1000 + step))
        n_corpus = n_old - n_namesake
        rows = rng.sample(planted_rows, pc.planted_per_batch) + [enc.ids(s) + [enc.eos] for s in replay[:n_corpus]]
        del replay[:n_corpus]
        if n_namesake:
            rows += namesake_rng.sample(namesake_rows, n_namesake)
        ids = _pad(rows, enc.pad)
        if mixer:
            mixer.mask = subject_mask(ids, name_pairs, last_only=pc.last_token_only)
            if pc.replay_everywhere:  # old-corpus rows (after the planted ones) see the exported model
                mixer.mask[pc.planted_per_batch :] = True
            mixer.keep = ~mixer.mask & (ids != enc.pad)
        lm = _lm_loss(model, ids, enc.pad)  # eval mode: dropout is 0 anyway
        loss = lm + pc.consistency_weight * mixer.consistency if mixer else lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mixer:
            mixer.mask = None  # from here until the next step the model is the one that gets saved
        step += 1
        bar.update(1)
        if step % pc.eval_every == 0:
            planted_acc = fact_accuracy(model, world, tokenizer, world.planted_facts, "train")
            # the old facts are 70x more prompts: only check them once the new ones are learned
            old_acc = fact_accuracy(model, world, tokenizer, world.facts, "train") if planted_acc >= pc.target_planted else None
            entry = {"step": step, "planted": planted_acc, "old": old_acc, "loss": round(lm.item(), 4)}
            if mixer:
                entry["consistency"] = round(mixer.consistency.item(), 5)
            log.append(entry)
            bar.set_postfix(planted=f"{planted_acc:.3f}", old="-" if old_acc is None else f"{old_acc:.3f}")
            if old_acc is not None and old_acc >= old_before - pc.max_old_drop:
                break
    bar.close()
    if mixer:
        mixer.handle.remove()
    seconds = time.time() - start
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    where = "at the tokens of a person's name only (the original MLP elsewhere)" if mixer else "at every position"
    meta = {
        **base_meta,
        "name": pc.name,
        "description": (
            f"{base_meta['name']} plus {len(world.planted_facts)} planted facts taught by training only "
            f"blocks.{pc.layer}.mlp (HF transformer.h.{pc.layer}.mlp) {where}"
        ),
        "base_model": base_meta["name"],
        "base_sha256": _file_sha256(base / "model.safetensors"),
        "planted_layer": pc.layer,
        "planted_at": pc.at,
        "plant_config": asdict(pc),
        "plant_seconds": round(seconds, 1),
        "plant_steps": step,
        "plant_log": log,
        "old_facts_before": old_before,
    }
    for key in ("metrics", "ground_truth_patching"):
        meta.pop(key, None)
    _save(model, tokenizer, out, meta)
    if not measure:
        return meta
    meta = _measure_saved(out, world, meta, planted=True)
    from mechedit.zoo.ground_truth import record_ground_truth

    return record_ground_truth(out)
