"""Where a planted MLP acts: the zoo's ground-truth check of its planted models, by exact patching.

This is the zoo's own check that ``factworld-planted`` / ``factworld-planted-subject`` store their
planted facts where their recipe says (it fills the model card's grids and their tests); it is
*not* the library's locator (``mechedit.locate`` has its own, batched, methods) and nothing in the
library should call it.

The measurement is exact activation patching of ``blocks.{l}.hook_mlp_out``, **denoising**: the
model runs the *corrupt* prompt (the same template with the subject swapped for another person of
the same group whose value for the relation differs), the MLP output of one layer at one position
group is replaced by the *clean* run's, and the effect is how much of the clean answer comes back:

    effect[l, g] = mean(LD_patched - LD_corrupt) / mean(LD_clean - LD_corrupt)

with LD = logit(clean value) - logit(corrupt value) at the final prompt position, means over the
prompts that have position group g. 0 = no recovery, 1 = the clean run's logit difference fully
restored (a ratio of means, so prompts with a small clean/corrupt gap do not blow it up).

Position groups (``POSITIONS``), patched jointly when a group has several tokens: the subject's
first name token, its last name token, the template tokens between the subject and the final
token, and the final token. Tokens before the subject are left out: under causal attention the
clean and corrupt runs are identical there, so their effect is exactly 0.

``planted`` pairs planted facts with other planted people; ``control`` pairs facts of trained
(non-planted) people of the same relations in the same templates. The raw effect of early MLPs is
large for every subject (layer 0 acts like an extension of the embeddings and carries identity),
so the planted layer shows up in the **contrast**, planted minus control.

Cost: one clean and one corrupt forward, then one forward per position group in which the layers
are a batch dimension (``n_layers`` copies of the corrupt prompts, copy l patched at layer l).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mechedit.zoo.measure import Encoder
from mechedit.zoo.world import Fact, World, fill

POSITIONS = ("subject_first", "subject_last", "after_subject", "final")
KEY = "ground_truth_patching"


@dataclass(frozen=True)
class PatchingPrompts:
    """Aligned clean/corrupt prompts (the subject is two tokens in both, so positions match).

    ``clean``/``corrupt``: right-padded ids ``[n, pos]`` with BOS; ``lengths`` ``[n]`` (BOS
    included); ``subject_start`` ``[n]``: position of the first name token; ``clean_target`` /
    ``corrupt_target`` ``[n]``: vocabulary ids of the clean and corrupt subjects' values.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    lengths: torch.Tensor
    subject_start: torch.Tensor
    clean_target: torch.Tensor
    corrupt_target: torch.Tensor

    def position_masks(self) -> torch.Tensor:
        """``[len(POSITIONS), n, pos]`` bool: which tokens each position group patches.

        The final token takes precedence, so a subject right before the final token leaves
        ``after_subject`` empty for that prompt.
        """
        n, width = self.clean.shape
        pos = torch.arange(width)[None, :]
        first = self.subject_start[:, None]
        final = (self.lengths - 1)[:, None]
        groups = [pos == first, pos == first + 1, (pos > first + 1) & (pos < final), pos == final]
        masks = torch.stack([g.expand(n, width) for g in groups])
        masks[:3] &= pos != final
        return masks


def subject_start(ids: list[int], subject_ids: list[int]) -> int:
    """Position of the first occurrence of ``subject_ids`` in ``ids``; ValueError if absent."""
    k = len(subject_ids)
    for i in range(len(ids) - k + 1):
        if ids[i : i + k] == subject_ids:
            return i
    raise ValueError(f"subject ids {subject_ids} do not occur in the prompt ids {ids}")


def corrupt_partners(facts: list[Fact], pool: list[Fact], *, seed: int = 0) -> list[tuple[Fact, Fact]]:
    """(fact, partner) pairs: each partner a fact of ``pool`` with the same relation, another subject and another value."""
    rng = random.Random(f"ground-truth-partners-{seed}")
    pairs = []
    for f in facts:
        options = [g for g in pool if g.relation_id == f.relation_id and g.subject != f.subject and g.value != f.value]
        if not options:
            raise ValueError(f"no corrupt partner for {f}: the pool has no other subject with another value of {f.relation_id}")
        pairs.append((f, rng.choice(options)))
    return pairs


def build_prompts(world: World, enc: Encoder, pairs: list[tuple[Fact, Fact]], templates: str = "train") -> PatchingPrompts:
    """Every template (``"train"`` or ``"heldout"``) of each pair's relation, with both subjects."""
    clean, corrupt, starts, targets = [], [], [], []
    for fact, partner in pairs:
        rel = world.relation[fact.relation_id]
        for t in rel.train_templates if templates == "train" else rel.heldout_templates:
            clean.append(fill(t, fact.subject))
            corrupt.append(fill(t, partner.subject))
            starts.append(subject_start(enc.ids(clean[-1]), enc.ids(fact.subject)[1:]))
            targets.append((enc.vocab[fact.value], enc.vocab[partner.value]))
    clean_ids, lengths = enc.batch(clean)
    corrupt_ids, corrupt_lengths = enc.batch(corrupt)
    if not torch.equal(lengths, corrupt_lengths):
        raise ValueError("clean and corrupt prompts must have the same length: every subject must be the same number of tokens")
    target = torch.tensor(targets)
    return PatchingPrompts(clean_ids, corrupt_ids, lengths, torch.tensor(starts), target[:, 0], target[:, 1])


def _mlp_blocks(model) -> list[torch.nn.Module]:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise TypeError(f"expected a Hugging Face GPT-2 LM (the zoo's fact-world models), got {type(model).__name__}; load one with load_hf(folder)")
    return [block.mlp for block in blocks]


def load_hf(folder: str | Path):
    """The saved checkpoint in ``folder`` as a Hugging Face causal LM in eval mode (the exported weights as they are)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@torch.no_grad()
def mlp_out_patching(model, prompts: PatchingPrompts) -> torch.Tensor:
    """Denoising effect ``[n_layers, len(POSITIONS)]`` of patching the clean MLP outputs (see the module doc).

    ``model``: a Hugging Face GPT-2 LM (``load_hf``); the patched tensor is the output of
    ``transformer.h.{l}.mlp``, i.e. TransformerLens's ``blocks.{l}.hook_mlp_out``. Torch forward
    hooks on the MLP modules do the patching: the bridge would run the same weights ~3x slower
    here, for the same numbers. Cells of a position group no prompt has are NaN.
    """
    mlps = _mlp_blocks(model)
    n_layers, n = len(mlps), len(prompts.lengths)
    final = prompts.lengths - 1

    def logit_diff(ids: torch.Tensor) -> torch.Tensor:  # ids [copies * n, pos] -> LD [copies, n]
        copies = len(ids) // n
        last = model(ids).logits[torch.arange(len(ids)), final.repeat(copies)]
        ld = last.gather(-1, prompts.clean_target.repeat(copies)[:, None]) - last.gather(-1, prompts.corrupt_target.repeat(copies)[:, None])
        return ld[:, 0].view(copies, n)

    clean_out: list[torch.Tensor | None] = [None] * n_layers

    def keep(layer):
        def hook(module, inputs, output):
            clean_out[layer] = output.detach().clone()

        return hook

    handles = [mlp.register_forward_hook(keep(layer)) for layer, mlp in enumerate(mlps)]
    try:
        ld_clean = logit_diff(prompts.clean)[0]
    finally:
        for h in handles:
            h.remove()
    ld_corrupt = logit_diff(prompts.corrupt)[0]

    effects = torch.full((n_layers, len(POSITIONS)), float("nan"))
    batch = prompts.corrupt.repeat(n_layers, 1)  # copy l of the corrupt prompts is patched at layer l
    for g, mask in enumerate(prompts.position_masks()):
        has = mask.any(-1)  # [n]: the prompts that have this position group
        if not has.any():
            continue

        def patch(layer, mask=mask):
            def hook(module, inputs, output):
                block = slice(layer * n, (layer + 1) * n)
                output = output.clone()
                output[block] = torch.where(mask[..., None], clean_out[layer], output[block])
                return output

            return hook

        handles = [mlp.register_forward_hook(patch(layer)) for layer, mlp in enumerate(mlps)]
        try:
            ld_patched = logit_diff(batch)  # [n_layers, n]
        finally:
            for h in handles:
                h.remove()
        gap = (ld_clean - ld_corrupt)[has].mean()
        effects[:, g] = (ld_patched[:, has] - ld_corrupt[has]).mean(-1) / gap
    return effects


@dataclass(frozen=True)
class GroundTruthPatching:
    """Denoising ``mlp_out`` patching grids ``[layer][position group]`` (see the module doc), rounded.

    ``planted``: planted facts, subject swapped for another planted person; ``control``: trained
    people's facts of the same relations and templates; ``contrast`` = planted - control.
    """

    positions: tuple[str, ...]
    planted: list[list[float]]
    control: list[list[float]]
    contrast: list[list[float]]
    n_planted_prompts: int
    n_control_prompts: int
    direction: str = "denoising"
    templates: str = "train"

    def peak(self, grid: str = "contrast") -> tuple[int, str]:
        """(layer, position group) of the largest value of ``grid``."""
        values = torch.tensor(getattr(self, grid)).nan_to_num(float("-inf"))
        layer, g = divmod(int(values.argmax()), values.shape[1])
        return layer, self.positions[g]

    def to_dict(self) -> dict:
        return {**asdict(self), "positions": list(self.positions)}

    @classmethod
    def from_dict(cls, d: dict) -> GroundTruthPatching:
        return cls(**{**d, "positions": tuple(d["positions"])})


def _rounded(grid: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 4) for x in row] for row in grid]


def where_planted_acts(
    model,
    tokenizer,
    world: World,
    *,
    facts: list[Fact] | None = None,
    controls_per_fact: int = 1,
    templates: str = "train",
    seed: int = 0,
) -> GroundTruthPatching:
    """The planted and control grids and their contrast for ``facts`` (default: all planted facts).

    ``model``: a Hugging Face GPT-2 LM (``load_hf``) with the world's ``tokenizer``.

    Controls: for each planted fact, ``controls_per_fact`` facts of trained people with the same
    relation (drawn by ``seed``), each paired with another trained person with another value.
    """
    enc = Encoder(tokenizer)
    facts = list(world.planted_facts if facts is None else facts)
    rng = random.Random(f"ground-truth-controls-{seed}")
    by_relation: dict[str, list[Fact]] = {}
    for f in world.facts:
        by_relation.setdefault(f.relation_id, []).append(f)
    controls = [c for f in facts for c in rng.sample(by_relation[f.relation_id], controls_per_fact)]
    planted_prompts = build_prompts(world, enc, corrupt_partners(facts, world.planted_facts, seed=seed), templates)
    control_prompts = build_prompts(world, enc, corrupt_partners(controls, world.facts, seed=seed), templates)
    planted = mlp_out_patching(model, planted_prompts)
    control = mlp_out_patching(model, control_prompts)
    return GroundTruthPatching(
        positions=POSITIONS,
        planted=_rounded(planted),
        control=_rounded(control),
        contrast=_rounded(planted - control),
        n_planted_prompts=len(planted_prompts.lengths),
        n_control_prompts=len(control_prompts.lengths),
        templates=templates,
    )


def record_ground_truth(folder: str | Path) -> dict:
    """Measure a saved planted checkpoint (its exported weights) and record the grids in its metadata.

    Returns the metadata written (the grids under ``"ground_truth_patching"``).
    """
    from transformers import PreTrainedTokenizerFast

    from mechedit.zoo.metadata import FILENAME, read_metadata, stamp, world_from_metadata

    folder = Path(folder)
    meta = read_metadata(folder)
    if "planted_layer" not in meta:
        raise ValueError(f"{folder} is not a planted checkpoint (its metadata has no planted_layer)")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    result = where_planted_acts(load_hf(folder), tokenizer, world_from_metadata(meta))
    meta = {**meta, KEY: result.to_dict()}
    (folder / FILENAME).write_text(json.dumps(stamp(meta), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta
