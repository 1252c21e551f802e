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

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mechedit.metrics import next_token_labels, token_cross_entropy
from mechedit.zoo.measure import Encoder, fact_accuracy, measure_world
from mechedit.zoo.metadata import read_metadata, world_from_metadata, world_metadata, write_metadata
from mechedit.zoo.tokenizer import build_tokenizer, save_tokenizer
from mechedit.zoo.world import World, WorldConfig, load_occupations


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
    """Optimisation settings. ``max_steps`` cuts a run short (for quick tests of the recipe)."""

    epochs: int = 24
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 1
    max_steps: int | None = None
    shape: ModelShape = field(default_factory=ModelShape)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Right-padded ``[len(rows), longest]`` ids."""
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids


@dataclass(frozen=True)
class PlantConfig:
    """Settings of the planting run: which layer's MLP learns the new facts, and how."""

    layer: int = 2
    max_steps: int = 1500
    batch_size: int = 64
    planted_per_batch: int = 16
    lr: float = 1e-3
    eval_every: int = 50
    target_planted: float = 0.98
    max_old_drop: float = 0.02
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.planted_per_batch < self.batch_size:
            raise ValueError("planted_per_batch must be between 1 and batch_size - 1")


def _deterministic(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _batches(enc: Encoder, sentences: list[str], batch_size: int, rng: random.Random) -> list[torch.Tensor]:
    """Shuffled, length-bucketed batches of ids ``[batch, pos]`` (BOS ... EOS, right-padded).

    Sorting within windows of 50 batches cuts padding roughly in half without making batch
    composition depend on length alone.
    """
    rows = [enc.ids(s) + [enc.eos] for s in sentences]
    rng.shuffle(rows)
    window = batch_size * 50
    batches = []
    for start in range(0, len(rows), window):
        chunk = sorted(rows[start : start + window], key=len)
        batches.extend(_pad(chunk[b : b + batch_size], enc.pad) for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _lm_loss(model: GPT2LMHeadModel, ids: torch.Tensor, pad: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a right-padded batch (nats)."""
    labels = next_token_labels(ids, ids != pad)
    return token_cross_entropy(model(ids).logits[:, :-1], labels, reduction="mean")


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
) -> dict:
    """Train the fact-world model from scratch and save it (HF checkpoint + ``metadata.json``).

    Returns the metadata written, including the measured ``metrics`` (see ``measure_world``) and
    ``train_seconds``. ``occupations`` defaults to WinoGender's list (``world.load_occupations()``).
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
    steps_per_epoch = -(-len(world.training_sentences(0)) // tc.batch_size)
    total = min(tc.epochs * steps_per_epoch, tc.max_steps or 10**12)

    def lr_at(step: int) -> float:
        if step < tc.warmup_steps:
            return tc.lr * (step + 1) / tc.warmup_steps
        frac = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
        return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + torch.cos(torch.tensor(frac * torch.pi)).item()))

    rng = random.Random(f"batches-{tc.seed}")
    start, step, history = time.time(), 0, []
    bar = tqdm(total=total, desc="training factworld", disable=not progress)
    for epoch in range(tc.epochs):
        for ids in _batches(enc, world.training_sentences(epoch), tc.batch_size, rng):
            if step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = _lm_loss(model, ids, enc.pad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
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
        model.train()
        if progress:
            tqdm.write(json.dumps(history[-1]))
        if step >= total:
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
    old_before = fact_accuracy(model, world, tokenizer, world.facts, "train")
    planted_rows = [enc.ids(s) + [enc.eos] for s in world.planting_sentences()]
    rng = random.Random(f"plant-{pc.seed}")
    replay: list[str] = []
    start, step, log = time.time(), 0, []
    bar = tqdm(total=pc.max_steps, desc=f"planting facts in blocks.{pc.layer}.mlp", disable=not progress)
    while step < pc.max_steps:
        if len(replay) < pc.batch_size:
            replay.extend(world.training_sentences(1000 + step))
        n_old = pc.batch_size - pc.planted_per_batch
        rows = rng.sample(planted_rows, pc.planted_per_batch) + [enc.ids(s) + [enc.eos] for s in replay[:n_old]]
        del replay[:n_old]
        loss = _lm_loss(model, _pad(rows, enc.pad), enc.pad)  # eval mode: dropout is 0 anyway
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % pc.eval_every == 0:
            planted_acc = fact_accuracy(model, world, tokenizer, world.planted_facts, "train")
            # the old facts are 70x more prompts: only check them once the new ones are learned
            old_acc = fact_accuracy(model, world, tokenizer, world.facts, "train") if planted_acc >= pc.target_planted else None
            log.append({"step": step, "planted": planted_acc, "old": old_acc, "loss": round(loss.item(), 4)})
            bar.set_postfix(planted=f"{planted_acc:.3f}", old="-" if old_acc is None else f"{old_acc:.3f}")
            if old_acc is not None and old_acc >= old_before - pc.max_old_drop:
                break
    bar.close()
    seconds = time.time() - start
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    meta = {
        **base_meta,
        "name": "factworld-planted",
        "description": (
            f"factworld plus {len(world.planted_facts)} planted facts taught by training only "
            f"blocks.{pc.layer}.mlp (HF transformer.h.{pc.layer}.mlp)"
        ),
        "base_model": "factworld",
        "planted_layer": pc.layer,
        "plant_config": asdict(pc),
        "plant_seconds": round(seconds, 1),
        "plant_steps": step,
        "plant_log": log,
        "old_facts_before": old_before,
    }
    meta.pop("metrics", None)
    _save(model, tokenizer, out, meta)
    return _measure_saved(out, world, meta, planted=True) if measure else meta
