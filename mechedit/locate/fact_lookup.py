"""Fact lookup (Geva et al. 2023, "Dissecting recall"; Guo et al. 2024, "Mechanistic Unlearning").

The picture these papers draw of factual recall in a causal LM: early-to-mid MLPs *enrich* the
subject's last token with the subject's attributes (the **fact lookup**); later attention heads at
the final position *extract* the asked-for attribute from the subject tokens. Guo et al. edit the
fact-lookup MLPs and find the edit robust. This module makes their localisation algorithmic, in
three measured steps on one set of facts. Every effect is on the **logit difference**
``LD = logit(answer) - logit(wrong answer)`` at each prompt's last token, over clean/corrupt
pairs (the clean prompt is the fact; the corrupt one swaps the subject for another subject of the
same token length, whose answer is the wrong answer), and is normalised as a **ratio of means**
over all pairs, so that it reads in units of the clean-minus-corrupt gap::

    gap = mean(LD_clean) - mean(LD_corrupt)

1. **Attribute probes** (``mechedit.probes.attribute_probes``): per depth, a linear probe on the
   residual stream predicting each fact's answer, with whole subjects held out, at the subject's
   last token (``position="subject_last"``: is the attribute written *there*?) and at the final
   token (``"last"``). Accuracy per depth, against the majority-class chance level.

2. **Extraction heads, by attention knockout** (Geva et al. §3): in the *clean* run, the final
   position is stopped from attending to the subject's tokens at one head of one layer (or at all
   heads of one layer). Blocking means the attention logits of those (query = final token, key =
   subject token) cells are set to ``-inf``: implemented on ``blocks.{l}.attn.hook_pattern`` by
   zeroing the cells and renormalising the final row over the remaining keys, which is exactly
   the softmax with those logits masked (``renormalize=False`` zeroes without renormalising
   instead). The TransformerLens 4.3 bridge computes ``hook_z`` from the *hooked* pattern on
   GPT-2, GPT-NeoX and Llama (checked by the tests). Effect of a knockout::

       knockout_effect = (mean(LD_clean) - mean(LD_knocked_out)) / gap

   1 = blocking that head's (layer's) reading of the subject removes the whole clean-vs-corrupt
   difference; 0 = no change; negative = the knockout helps the clean answer. **Extraction heads**
   are the heads with ``knockout_effect >= head_threshold`` (default 0.1: one head's reading of
   the subject carries a tenth of the gap); the **earliest extraction layer** ``E`` is the lowest
   layer holding one. Where no head reaches the threshold there is no ``E`` (and no MLP scan,
   unless ``extraction_layer`` is given).

3. **Fact-lookup MLPs, by path patching** (Guo et al.'s CounterFact procedure): the *corrupt*
   run is the base. For MLP layer ``l < E`` the path ``mlp_l -> resid_pre E`` at the subject
   tokens is patched: the residual stream entering block ``E`` gets, at the subject's token
   positions only, the difference ``mlp_out_l(clean) - mlp_out_l(corrupt)`` added. Everything
   below block ``E`` is the corrupt run (frozen), so the clean MLP output reaches the rest of the
   network only directly, through the residual stream at the subject tokens as block ``E`` and
   later blocks read it; blocks ``E ..`` then run freely. Effect (denoising)::

       lookup_effect[l] = (mean(LD_patched_l) - mean(LD_corrupt)) / gap

   1 = the clean logit difference fully restored by that path; 0 = nothing. The **fact-lookup
   MLPs** are the candidate layers (``l < E``) with ``lookup_effect >= threshold`` (default 0.02,
   the paper's). ``min_mlps = k`` adds the ``k`` highest-effect candidates that miss the
   threshold, flagged ``below_threshold`` in the circuit's config. Layers ``>= E`` cannot reach
   the receiver and are NaN. The same path effect is also measured into *every* receiver layer
   (``FactLookup.paths``, axes ``receiver, layer``), and as an upper bound the whole clean
   residual at the subject tokens restored into ``resid_pre R`` (``FactLookup.subject_state``:
   exactly 1 at ``R = 0``, since the prompts differ only there; whatever is below 1 at ``R``
   had already been read from the subject by the final token's blocks ``< R``).

**Control facts** (``control=``): as in causal tracing, the same measurement on facts the model
stores elsewhere (e.g. trained people, where the facts are planted ones) is subtracted from the
MLP path effects and from the head knockout effects before the thresholds; each set is
normalised by its own gap. Early MLPs carry subject identity for every subject (on the fact world
``mlp_0``'s subject output restores the whole gap of any fact into ``resid_pre 1``), and the
earliest heads that read the name read every name; the contrast removes those shared parts. On
``factworld-planted-subject`` (20 facts planted in MLP 1 at the name tokens, 20 control facts) the
contrast moves the measured extraction layer from 1 to 3 (a head at 0.19 for the planted facts),
and the fact-lookup set is exactly MLP 1 (path effect 0.37, the others within 0.05 of 0).

**On the fact world** (``mechedit.load("factworld")``; see ``zoo/MODEL_CARD.md``; 96 birth-city
facts): the final token reads the person through heads of layers 1-3 (knockout effects up to
0.26 / 0.15 / 0.14; layer 0 at most 0.004), so ``E = 1`` and the fact-lookup set is MLP 0 (path
effect 1.00). Probes at the subject's last token read the attribute at chance at every depth
(the value is written at the final token, probe accuracy 0.88 at ``resid_pre 4``): what MLP 0
writes at the name is what later heads need to find the value, not the value itself. On
``factworld-planted`` (MLP 2 trained at every position) no MLP is specific to the planted facts
against a control (MLP 2's subject path into ``resid_pre 3``: -0.007): planting at every position
does not store facts as subject enrichment. The locator reports what it measures; it does not
lower a threshold to make something appear. ``extraction_layer=`` (a receiver of your choosing,
recorded as given) and ``min_mlps`` keep a downstream comparison possible.

Cost: a clean and a corrupt forward; ``n_layers * (n_heads + 1)`` knockout variants and
``n_layers * (n_layers + 1) / 2`` path variants, each one row per pair, batched ``batch_size``
rows per forward. They are full forwards: a knockout at layer ``l`` changes only the final token
from block ``l`` on, and a path only blocks ``>= R``, so resuming from cached runs
(``mechedit.resume``) would cut the cost; not done yet. About 10 s on one CPU thread for 40 facts
x 4 corruptions on the fact world.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechedit.checks import HookCheck, hook_check_record, require_eval_mode
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.models import model_device
from mechedit.probes import ProbeResult, attribute_probes
from mechedit.progress import tqdm
from mechedit.prompts import FactPrompt, PromptPair, TokenizedPairs, facts_with_subjects
from mechedit.provenance import Provenance
from mechedit.resume import check_resumable
from mechedit.scores import Scores
from mechedit.tokens import subject_token_positions, token_ids, tokenize_pairs, tokenize_prompts

__all__ = ["FactLookup", "FactLookupConfig", "corrupt_subject_pairs", "fact_lookup", "knockout_logits"]


# --------------------------------------------------------------------------------------------
# Settings and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactLookupConfig:
    """Settings of ``fact_lookup`` (the module docstring defines every effect).

    Attributes:
        threshold: a candidate MLP joins the fact-lookup set when its path effect (fraction of
            the clean-minus-corrupt logit-difference gap restored) is ``>= threshold``; in (0, 1].
            Default 0.02 (Guo et al.'s CounterFact procedure).
        head_threshold: a head is an extraction head when knocking out its attention from the
            final token to the subject removes ``>= head_threshold`` of the gap; in (0, 1].
        min_mlps: keep at least this many MLP candidates (the highest effects), flagging those
            under ``threshold`` as ``below_threshold``; 0 keeps the threshold's set as it is.
        extraction_layer: the receiver layer of the MLP path patching; ``None`` measures it
            (the lowest layer with an extraction head). Recorded as ``"given"`` when set.
        n_corrupt: corrupt subjects per fact when ``fact_lookup`` builds the pairs itself.
        seed: draws the corrupt subjects and splits the probes' subjects.
        renormalize: knockout renormalises the final token's attention over the other keys
            (= attention logits masked to ``-inf``, Geva et al.); False only zeroes the weights,
            so the other keys keep softmax weights whose denominator still includes the
            subject's logits (the final token is then not fully blind to the subject).
        probes: fit the attribute probes (needs facts about >= 2 subjects and >= 2 answers).
        probe_test_fraction, probe_l2: the probes' held-out fraction of subjects and penalty.
        batch_size: rows (pair x variant) per forward pass.
    """

    threshold: float = 0.02
    head_threshold: float = 0.1
    min_mlps: int = 0
    extraction_layer: int | None = None
    n_corrupt: int = 4
    seed: int = 0
    renormalize: bool = True
    probes: bool = True
    probe_test_fraction: float = 0.25
    probe_l2: float = 1e-2
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("threshold", "head_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
                raise ValueError(
                    f"{name} must be a number in (0, 1] (a fraction of the clean-minus-corrupt "
                    f"logit-difference gap), got {value!r}"
                )
        for name, low in (("min_mlps", 0), ("n_corrupt", 1), ("batch_size", 1), ("seed", None)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                raise ValueError(f"{name} must be an int{'' if low is None else f' >= {low}'}, got {value!r}")
        layer = self.extraction_layer
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
            raise ValueError(f"extraction_layer must be None or a layer index >= 0, got {layer!r}")
        for name in ("renormalize", "probes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 0.0 < float(self.probe_test_fraction) < 1.0:
            raise ValueError(f"probe_test_fraction must be in (0, 1), got {self.probe_test_fraction!r}")
        if not self.probe_l2 >= 0:
            raise ValueError(f"probe_l2 must be >= 0, got {self.probe_l2!r}")


@dataclass(frozen=True, eq=False)
class FactLookup:
    """What ``fact_lookup`` returns (effects in units of the clean-minus-corrupt LD gap).

    Attributes:
        mlps: the fact-lookup MLPs, ``Component("mlp", l)`` (whole blocks, as
            ``mechedit.edit.finetune`` trains them), highest effect first; its config holds the
            effects, probe accuracies, settings and ``below_threshold`` (layers kept by
            ``min_mlps`` only).
        heads: the extraction heads, ``Component("head", l, head=h)``, highest effect first.
        extraction_layer: the receiver layer ``E`` (``None``: no head reached ``head_threshold``
            and none was given).
        extraction_layer_source: ``"measured"``, ``"given"`` or ``"none"``.
        mlp_effects: ``Scores`` over ``("layer",)`` on site ``mlp``: path effect of
            ``mlp_l -> resid_pre E`` at the subject tokens; NaN for ``l >= E``.
        head_effects: ``Scores`` over ``("layer", "head")`` on site ``head``: knockout effects.
        layer_effects: ``Scores`` over ``("layer",)`` on site ``attn``: knockout of every head
            of the layer at once.
        paths: ``Scores`` over ``("receiver", "layer")`` on site ``mlp``: the path effect of
            ``mlp_layer -> resid_pre receiver``; NaN where ``layer >= receiver``.
        subject_state: ``Scores`` over ``("layer",)`` on site ``resid_pre``: the whole clean
            residual restored at the subject tokens into ``resid_pre`` of that layer.
        control_paths: the control facts' own ``paths`` table (``None`` without ``control``);
            with a control, ``paths`` and ``mlp_effects`` are facts minus control.
        control_head_effects: the control facts' own knockout effects (``None`` without
            ``control``); with a control, the extraction heads and layer are those whose
            ``head_effects`` minus these reach ``head_threshold``.
        probes_subject, probes_last: ``ProbeResult`` at the subject's last token / the final
            token (``None`` with ``probes=False``).
        clean_logit_diff, corrupt_logit_diff: mean LD of the clean / corrupt runs (nats).
        pairs: the clean/corrupt pairs used, one per row; ``fact_index[i]`` is pair i's fact.
        config: the settings.
    """

    mlps: Circuit
    heads: Circuit
    extraction_layer: int | None
    extraction_layer_source: str
    mlp_effects: Scores
    head_effects: Scores
    layer_effects: Scores
    paths: Scores
    subject_state: Scores
    control_paths: Scores | None
    control_head_effects: Scores | None
    probes_subject: ProbeResult | None
    probes_last: ProbeResult | None
    clean_logit_diff: float
    corrupt_logit_diff: float
    pairs: tuple[PromptPair, ...]
    fact_index: tuple[int, ...]
    config: FactLookupConfig

    def summary(self) -> dict[str, Any]:
        """JSON-able figures: the circuits, extraction layer, effects and probe accuracies."""
        return dict(self.mlps.config["fact_lookup"])


# --------------------------------------------------------------------------------------------
# Pairs: the subject swapped for another subject of the same token length
# --------------------------------------------------------------------------------------------


def _swap_subject(fact: FactPrompt, subject: str) -> str:
    start, end = fact.subject_span
    return fact.prompt[:start] + subject + fact.prompt[end:]


def corrupt_subject_pairs(
    model: Any, facts: Sequence[FactPrompt], *, n_corrupt: int = 4, seed: int = 0
) -> tuple[list[PromptPair], list[int]]:
    """Clean/corrupt pairs: each fact against up to ``n_corrupt`` other facts' subjects.

    A partner of fact ``f`` is another fact of the list with the same ``relation_id``, another
    subject, another target, a subject of as many tokens and a swapped prompt of as many tokens
    as ``f``'s (so positions line up); partners are drawn without replacement with
    ``random.Random(seed)``. The corrupt prompt is ``f``'s prompt with the partner's subject in
    place of ``f``'s, its wrong answer the partner's target.

    Returns:
        ``(pairs, fact_index)``: the pairs, and for each the index of its fact in ``facts``.

    Raises:
        ValueError: a fact without a subject, or a fact without any partner (pass ``pairs=`` to
            ``fact_lookup`` with corruptions of your own).
    """
    facts = facts_with_subjects(facts, why="fact lookup swaps the subject for another")
    rng = random.Random(seed)
    n_subject = [len(subject_token_positions(model, f)) for f in facts]
    n_prompt = [len(token_ids(model, f.prompt)) for f in facts]
    pairs, index = [], []
    for i, fact in enumerate(facts):
        options = list(dict.fromkeys(
            g.subject for g, k in zip(facts, n_subject, strict=True)
            if g.relation_id == fact.relation_id and g.subject != fact.subject
            and g.target.strip() != fact.target.strip() and k == n_subject[i]
        ))
        rng.shuffle(options)
        targets = {g.subject: g.target for g in facts if g.relation_id == fact.relation_id}
        chosen = 0
        for subject in options:
            corrupt = _swap_subject(fact, subject)
            if len(token_ids(model, corrupt)) != n_prompt[i]:
                continue
            pairs.append(PromptPair(clean=fact.prompt, corrupt=corrupt, answer=fact.target,
                                    wrong_answer=targets[subject], pair_id=f"{i}:{subject}"))
            index.append(i)
            chosen += 1
            if chosen == n_corrupt:
                break
        if not chosen:
            raise ValueError(
                f"facts[{i}] ({fact.prompt!r}) has no partner: no other fact of relation "
                f"{fact.relation_id!r} with another target and a subject of {n_subject[i]} tokens. "
                "Give more facts of the relation, or pass pairs= with corruptions of your own."
            )
    return pairs, index


@dataclass(frozen=True)
class _Rows:
    """The tokenised pairs and, per row, its subject token mask."""

    batch: TokenizedPairs
    subject: Bool[Tensor, "row pos"]

    def __len__(self) -> int:
        return len(self.batch)


def _rows(model: Any, facts: list[FactPrompt], pairs: list[PromptPair], index: list[int]) -> _Rows:
    batch = tokenize_pairs(model, pairs, device=model_device(model))
    n_pos = batch.clean_tokens.shape[1]
    subject = torch.zeros(len(pairs), n_pos, dtype=torch.bool)
    for row, i in enumerate(index):
        span = subject_token_positions(model, facts[i])
        if span.stop - 1 >= int(batch.last_positions[row]):
            raise ValueError(
                f"facts[{i}] ({facts[i].prompt!r}): the subject reaches the final token, which "
                "reads the subject by attention only from later positions; the prompt must "
                "continue after the subject"
            )
        subject[row, span.start : span.stop] = True
    return _Rows(batch, subject.to(batch.clean_tokens.device))


# --------------------------------------------------------------------------------------------
# Batched variants: each row is (variant, pair), each variant a set of hooks
# --------------------------------------------------------------------------------------------

# hooks(variant index of each row [R], pair index of each row [R]) -> forward hooks
HookMaker = Callable[[Tensor, Tensor], list[tuple[str, Callable[..., Any]]]]


def _logit_diffs(logits: Tensor, batch: TokenizedPairs, pair: Tensor) -> Tensor:
    rows = torch.arange(len(pair), device=logits.device)
    last = logits[rows, batch.last_positions[pair]].float()
    return last.gather(1, batch.answer_ids[pair][:, None])[:, 0] - last.gather(1, batch.wrong_ids[pair][:, None])[:, 0]


def _run_variants(
    model: Any, rows: _Rows, tokens: Tensor, n_variants: int, hooks: HookMaker, batch_size: int, bar: Any
) -> Float[Tensor, "variant pair"]:
    """The LD of every (variant, pair) row, ``batch_size`` rows per forward."""
    n = len(rows)
    out = torch.empty(n_variants * n)
    device = tokens.device
    for lo in range(0, n_variants * n, batch_size):
        flat = torch.arange(lo, min(lo + batch_size, n_variants * n), device=device)
        variant, pair = flat // n, flat % n
        with torch.no_grad(), model.hooks(fwd_hooks=hooks(variant, pair)):
            logits = model(tokens[pair])
        out[lo : lo + len(flat)] = _logit_diffs(logits, rows.batch, pair).cpu()
        bar.update(len(flat))
    return out.view(n_variants, n)


def _knockout_hook(
    knock: Bool[Tensor, "row head"], subject: Bool[Tensor, "row pos"], last: Tensor, renormalize: bool
) -> Callable[..., Tensor]:
    """Stop each row's final query from attending to its subject keys at the knocked-out heads."""

    def hook(pattern: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
        # pattern [row, head, query, key]; only the final query's row changes
        rows = torch.arange(pattern.shape[0], device=pattern.device)
        final = pattern[rows, :, last]  # [row, head, key]
        blocked = knock[:, :, None].to(pattern.device) & subject[:, None, : pattern.shape[-1]].to(pattern.device)
        final = final.masked_fill(blocked, 0.0)
        if renormalize:
            final = final / final.sum(-1, keepdim=True).clamp_min(torch.finfo(final.dtype).tiny)
        out = pattern.clone()
        out[rows, :, last] = final
        return out

    return hook


def _knockout_hooks(
    model: Any, knock: Bool[Tensor, "row layer head"], subject: Tensor, last: Tensor, renormalize: bool
) -> list[tuple[str, Callable[..., Any]]]:
    return [
        (f"blocks.{layer}.attn.hook_pattern", _knockout_hook(knock[:, layer], subject, last, renormalize))
        for layer in range(model.cfg.n_layers)
        if bool(knock[:, layer].any())
    ]


def knockout_logits(
    model: Any,
    facts: Sequence[FactPrompt],
    *,
    knock: Bool[Tensor, "layer head"] | None = None,
    renormalize: bool = True,
    batch_size: int = 64,
) -> Float[Tensor, "fact vocab"]:
    """Final-token logits with the final token's attention to the subject blocked (Geva et al.).

    Args:
        facts: prompts with a ``subject`` that ends before the final token.
        knock: ``Bool[n_layers, n_heads]``, the heads whose (final token -> subject tokens)
            attention is blocked; ``None`` blocks every head of every layer.
        renormalize: as ``FactLookupConfig.renormalize``.

    Returns:
        ``Float[fact, vocab]`` logits at each prompt's last token (CPU, float32). With every head
        blocked and the subject right before the final token, they do not depend on the subject.
    """
    require_eval_mode(model, what="knockout_logits")
    facts = facts_with_subjects(facts, why="the knockout blocks attention to the subject's tokens")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if knock is None:
        knock = torch.ones(n_layers, n_heads, dtype=torch.bool)
    if not isinstance(knock, Tensor) or knock.dtype != torch.bool or tuple(knock.shape) != (n_layers, n_heads):
        raise ValueError(f"knock must be a Bool[n_layers={n_layers}, n_heads={n_heads}] tensor")
    batch = tokenize_prompts(model, [f.prompt for f in facts], device=model_device(model))
    out = []
    for lo in range(0, len(facts), batch_size):
        chunk = list(range(lo, min(lo + batch_size, len(facts))))
        subject = torch.zeros(len(chunk), batch.tokens.shape[1], dtype=torch.bool)
        for r, i in enumerate(chunk):
            span = subject_token_positions(model, facts[i])
            if span.stop - 1 >= int(batch.last_positions[i]):
                raise ValueError(f"facts[{i}] ({facts[i].prompt!r}): the subject reaches the final token")
            subject[r, span.start : span.stop] = True
        last = batch.last_positions[chunk]
        hooks = _knockout_hooks(model, knock[None].expand(len(chunk), -1, -1), subject, last, renormalize)
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(batch.tokens[chunk])
        out.append(logits[torch.arange(len(chunk)), last].float().cpu())
    return torch.cat(out)


def _add_hook(delta: Tensor, receiver: Tensor, layer: int) -> Callable[..., Tensor]:
    """Add ``delta[r]`` to the residual entering block ``layer`` for rows whose receiver is it."""
    take = (receiver == layer).to(delta.dtype)[:, None, None]

    def hook(resid: Tensor, hook: Any = None) -> Tensor:  # noqa: ARG001
        return resid + (delta * take).to(resid.device, resid.dtype)

    return hook


# --------------------------------------------------------------------------------------------
# The three steps
# --------------------------------------------------------------------------------------------


def _grabber(cache: dict[str, Tensor], key: str) -> Callable[..., None]:
    # keyed by our name: the bridge may report an aliased hook.name
    def grab(act: Tensor, hook: Any = None) -> None:  # noqa: ARG001
        cache[key] = act.detach().float()

    return grab


def _baselines(model: Any, rows: _Rows) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Clean and corrupt LD per pair, and both runs' ``mlp_out`` / ``resid_pre`` per layer."""
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.{site}" for site in ("hook_mlp_out", "hook_resid_pre") for i in range(n_layers)]
    pair = torch.arange(len(rows), device=rows.batch.clean_tokens.device)
    out = []
    for tokens in (rows.batch.clean_tokens, rows.batch.corrupt_tokens):
        cache: dict[str, Tensor] = {}
        hooks = [(name, _grabber(cache, name)) for name in names]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(tokens)
        out.append((_logit_diffs(logits, rows.batch, pair).cpu(), cache))
    (clean_ld, clean), (corrupt_ld, corrupt) = out
    return clean_ld, corrupt_ld, clean, corrupt


def _knockouts(model: Any, rows: _Rows, cfg: FactLookupConfig, bar: Any) -> Float[Tensor, "layer head_plus_1 pair"]:
    """LD with one head (index ``h < n_heads``) or all heads (index ``n_heads``) of a layer blocked."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    knock = torch.zeros(n_layers, n_heads + 1, n_layers, n_heads, dtype=torch.bool)
    for layer in range(n_layers):
        knock[layer, torch.arange(n_heads), layer, torch.arange(n_heads)] = True
        knock[layer, n_heads, layer] = True
    knock = knock.view(-1, n_layers, n_heads)

    def hooks(variant: Tensor, pair: Tensor) -> list[tuple[str, Callable[..., Any]]]:
        return _knockout_hooks(model, knock[variant.cpu()], rows.subject[pair], rows.batch.last_positions[pair], cfg.renormalize)

    lds = _run_variants(model, rows, rows.batch.clean_tokens, len(knock), hooks, cfg.batch_size, bar)
    return lds.view(n_layers, n_heads + 1, len(rows))


def _paths(
    model: Any, rows: _Rows, clean: dict[str, Tensor], corrupt: dict[str, Tensor], cfg: FactLookupConfig, bar: Any
) -> tuple[Tensor, Tensor]:
    """LD of every path ``mlp_l -> resid_pre R`` (``l < R``) and of the subject state at each R.

    Returns ``paths [R, l, pair]`` (NaN for ``l >= R``) and ``state [R, pair]``.
    """
    n_layers = model.cfg.n_layers
    mask = rows.subject[:, :, None].float()
    # variant: (receiver, sender) with sender = layer l's MLP, or -1 for the whole residual
    variants = [(r, -1) for r in range(n_layers)] + [(r, s) for r in range(1, n_layers) for s in range(r)]
    receiver = torch.tensor([r for r, _ in variants])
    deltas = torch.stack([
        (clean[f"blocks.{s}.hook_mlp_out"] - corrupt[f"blocks.{s}.hook_mlp_out"]) if s >= 0
        else (clean[f"blocks.{r}.hook_resid_pre"] - corrupt[f"blocks.{r}.hook_resid_pre"])
        for r, s in variants
    ]) * mask[None]  # [variant, pair, pos, d_model], zero outside the subject

    def hooks(variant: Tensor, pair: Tensor) -> list[tuple[str, Callable[..., Any]]]:
        v = variant.cpu()
        delta, recv = deltas[v, pair.cpu()], receiver[v]
        return [(f"blocks.{r}.hook_resid_pre", _add_hook(delta, recv, r)) for r in sorted(set(recv.tolist()))]

    lds = _run_variants(model, rows, rows.batch.corrupt_tokens, len(variants), hooks, cfg.batch_size, bar)
    paths = torch.full((n_layers, n_layers, len(rows)), float("nan"))
    state = torch.empty(n_layers, len(rows))
    for v, (r, s) in enumerate(variants):
        if s < 0:
            state[r] = lds[v]
        else:
            paths[r, s] = lds[v]
    return paths, state


def _probe(model: Any, facts: list[FactPrompt], cfg: FactLookupConfig, position: str) -> ProbeResult:
    try:
        return attribute_probes(model, facts, position=position, test_fraction=cfg.probe_test_fraction,
                                seed=cfg.seed, l2=cfg.probe_l2, batch_size=cfg.batch_size)
    except ValueError as err:
        raise ValueError(f"the attribute probes at position {position!r} cannot be fitted: {err}. "
                         "Give facts about more subjects and answers, or pass probes=False") from None


def _inputs(
    model: Any, facts: Sequence[FactPrompt], pairs: Sequence[PromptPair] | None, cfg: FactLookupConfig, what: str
) -> tuple[list[FactPrompt], list[PromptPair], list[int], _Rows]:
    """Checked facts, their pairs (given or built), each pair's fact index, and the token rows."""
    facts = facts_with_subjects(facts, what=what, why="fact lookup reads and swaps the subject's tokens")
    if pairs is None:
        pair_list, index = corrupt_subject_pairs(model, facts, n_corrupt=cfg.n_corrupt, seed=cfg.seed)
    else:
        if isinstance(pairs, PromptPair) or not isinstance(pairs, Sequence) or len(pairs) != len(facts):
            raise ValueError(f"pairs must be a list of PromptPair, one per fact ({len(facts)}); "
                             f"got {len(pairs) if isinstance(pairs, Sequence) else type(pairs).__name__}")
        for i, (pair, fact) in enumerate(zip(pairs, facts, strict=True)):
            if not isinstance(pair, PromptPair) or pair.clean != fact.prompt:
                raise ValueError(f"pairs[{i}] must be a PromptPair whose clean prompt is facts[{i}].prompt "
                                 f"({fact.prompt!r})")
        pair_list, index = list(pairs), list(range(len(facts)))
    return facts, pair_list, index, _rows(model, facts, pair_list, index)


def _measure(model: Any, rows: _Rows, cfg: FactLookupConfig, bar: Any, what: str) -> dict[str, Any]:
    """Every effect of one fact set, normalised by its own clean-minus-corrupt gap."""
    clean_ld, corrupt_ld, clean, corrupt = _baselines(model, rows)
    gap = float(clean_ld.mean() - corrupt_ld.mean())
    if not abs(gap) > 1e-6:
        raise ValueError(
            f"the {what}' corruptions do not change the logit difference (clean {float(clean_ld.mean()):.4g}, "
            f"corrupt {float(corrupt_ld.mean()):.4g}): nothing to normalise by; use facts the model knows"
        )
    knocked = _knockouts(model, rows, cfg, bar)
    paths_ld, state_ld = _paths(model, rows, clean, corrupt, cfg, bar)
    return {
        "clean_ld": clean_ld, "corrupt_ld": corrupt_ld, "gap": gap,
        "knockout": (float(clean_ld.mean()) - knocked.mean(-1)) / gap,  # [layer, head + 1]
        "paths": (paths_ld.mean(-1) - float(corrupt_ld.mean())) / gap,  # [receiver, layer]
        "state": (state_ld.mean(-1) - float(corrupt_ld.mean())) / gap,  # [receiver]
    }


def _json(x: Tensor) -> Any:
    """A tensor as nested lists with NaN as None, rounded (JSON has no NaN)."""
    return [_json(v) for v in x] if x.ndim else (None if math.isnan(float(x)) else round(float(x), 5))


def fact_lookup(
    model: Any,
    facts: Sequence[FactPrompt],
    *,
    pairs: Sequence[PromptPair] | None = None,
    control: Sequence[FactPrompt] | None = None,
    config: FactLookupConfig | None = None,
    hook_check: HookCheck | bool = True,
    progress: bool = True,
    **settings: Any,
) -> FactLookup:
    """Locate the fact-lookup MLPs and extraction heads of ``facts`` (see the module docstring).

    Args:
        model: a causal-LM ``TransformerBridge`` in eval mode.
        facts: ``FactPrompt``s with a ``subject`` (ending before the final token) and a one-token
            ``target``; give several facts of one relation (the corruptions and probes draw on
            the other facts' subjects and answers).
        pairs: optional clean/corrupt pairs, one per fact (``pairs[i].clean == facts[i].prompt``;
            the corrupt prompt must put its subject on the same token positions); ``None`` builds
            ``n_corrupt`` per fact with ``corrupt_subject_pairs``.
        control: optional control facts (e.g. facts the model stores elsewhere, same relations
            and templates), corrupted the same way: their MLP path effects (each normalised by
            the control's own gap) are subtracted from the facts' before the threshold, leaving
            what is specific to ``facts`` (as causal tracing's ``control=``). The extraction
            heads and layer are chosen the same way, from the facts' knockout effects minus the
            control's (heads every subject is read through drop out); ``head_effects`` stays
            the facts' own, ``mlp_effects`` / ``paths`` are contrasts, and ``control_paths`` /
            ``control_head_effects`` hold the control's own tables.
        config: a ``FactLookupConfig``; keyword ``settings`` override its fields
            (``fact_lookup(model, facts, threshold=0.05)``).
        hook_check: as in the other locators (``checks.check_hooks``; in the provenance).
        progress: show a progress bar over the batched variants.

    Returns:
        ``FactLookup``.

    Raises:
        ValueError: empty facts, a fact without a subject or whose subject reaches the final
            token, pairs of different token lengths or not matching the facts, a corruption that
            does not change the logit difference, settings out of range, a non-causal model.
        RuntimeError: the model is in training mode.
    """
    require_eval_mode(model, what="fact_lookup")
    cfg = replace(config or FactLookupConfig(), **settings) if settings else (config or FactLookupConfig())
    if not isinstance(cfg, FactLookupConfig):
        raise ValueError(f"config must be a FactLookupConfig, got {type(config).__name__}")
    problem = check_resumable(model)
    if problem:
        raise ValueError(f"fact lookup reads the final token of a causal language model: {problem}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if cfg.extraction_layer is not None and cfg.extraction_layer >= n_layers:
        raise ValueError(f"extraction_layer {cfg.extraction_layer} out of range: the model has {n_layers} layers")
    facts, pair_list, index, rows = _inputs(model, facts, pairs, cfg, "facts")
    control_inputs = None
    if control is not None:
        control_inputs = _inputs(model, control, None, cfg, "control")
    checked = hook_check_record(model, hook_check)
    probes_subject = _probe(model, facts, cfg, "subject_last") if cfg.probes else None
    probes_last = _probe(model, facts, cfg, "last") if cfg.probes else None

    n_variants = n_layers * (n_heads + 1) + n_layers * (n_layers + 1) // 2
    n_total = n_variants * (len(rows) + (len(control_inputs[3]) if control_inputs else 0))
    bar = tqdm(total=n_total, desc="fact lookup", disable=not progress)
    measured = _measure(model, rows, cfg, bar, "facts")
    head_effects, layer_effects = measured["knockout"][:, :n_heads], measured["knockout"][:, n_heads]
    state_effects, path_effects = measured["state"], measured["paths"]
    control_measured = None
    if control_inputs is not None:
        # what every subject's MLP output carries is subtracted: what remains is specific to facts
        control_measured = _measure(model, control_inputs[3], cfg, bar, "control")
        path_effects = path_effects - control_measured["paths"]
    bar.close()
    clean_ld, corrupt_ld = measured["clean_ld"], measured["corrupt_ld"]

    # with a control, heads that read every subject alike (on the fact world: layer 0) are not
    # extraction heads of these facts
    selector = head_effects if control_measured is None else head_effects - control_measured["knockout"][:, :n_heads]
    above = (selector >= cfg.head_threshold).nonzero().tolist()
    if cfg.extraction_layer is not None:
        extraction, source = cfg.extraction_layer, "given"
    elif above:
        extraction, source = min(layer for layer, _ in above), "measured"
    else:
        extraction, source = None, "none"
    mlp_effects = path_effects[extraction] if extraction is not None else torch.full((n_layers,), float("nan"))
    candidates = sorted(range(extraction or 0), key=lambda i: (-float(mlp_effects[i]), i))
    chosen = [i for i in candidates if float(mlp_effects[i]) >= cfg.threshold]
    below = [i for i in candidates if i not in chosen][: max(0, cfg.min_mlps - len(chosen))]
    head_order = sorted(above, key=lambda lh: (-float(selector[lh[0], lh[1]]), lh[0], lh[1]))

    summary = {
        "config": asdict(cfg),
        "extraction_layer": extraction,
        "extraction_layer_source": source,
        "mlps": chosen + below,
        "below_threshold": below,
        "heads": head_order,
        "mlp_effects": _json(mlp_effects),
        "head_effects": _json(head_effects),
        "layer_effects": _json(layer_effects),
        "path_effects": _json(path_effects),
        "subject_state_effects": _json(state_effects),
        "clean_logit_diff": round(float(clean_ld.mean()), 5),
        "corrupt_logit_diff": round(float(corrupt_ld.mean()), 5),
        "clean_top1_margin_positive": round(float((clean_ld > 0).float().mean()), 4),
        "n_facts": len(facts),
        "n_pairs": len(rows),
        "probes": {
            "subject_last": None if probes_subject is None else probes_subject.summary(),
            "last": None if probes_last is None else probes_last.summary(),
        },
        "metric": "normalized_logit_diff (ratio of means over pairs)",
        "control": None if control_measured is None else {
            "n_facts": len(control_inputs[0]),
            "n_pairs": len(control_inputs[3]),
            "clean_logit_diff": round(float(control_measured["clean_ld"].mean()), 5),
            "corrupt_logit_diff": round(float(control_measured["corrupt_ld"].mean()), 5),
            "path_effects": _json(control_measured["paths"]),
            "head_effects": _json(control_measured["knockout"][:, :n_heads]),
        },
    }
    texts = [t for p in pair_list for t in (p.clean, p.corrupt)]
    if control_inputs is not None:
        texts += [t for p in control_inputs[1] for t in (p.clean, p.corrupt)]
    provenance = Provenance.of(model, data=texts, seed=cfg.seed, hook_check=checked)
    common = {"n_pairs": len(rows), "gap": measured["gap"], "extraction_layer": extraction,
              "threshold": cfg.threshold, "head_threshold": cfg.head_threshold, "metric": "normalized_logit_diff",
              "contrast": control is not None}
    mlps = Circuit(tuple(Component("mlp", i) for i in chosen + below), method="fact_lookup",
                   config={"fact_lookup": summary}, provenance=provenance,
                   description=f"fact-lookup MLPs: path effect into resid_pre {extraction} >= {cfg.threshold}"
                   + (f" (+{len(below)} below threshold by min_mlps)" if below else ""))
    heads = Circuit(tuple(Component("head", i, head=h) for i, h in head_order), method="fact_lookup",
                    config={"fact_lookup": summary}, provenance=provenance,
                    description=f"extraction heads: attention-knockout effect >= {cfg.head_threshold}"
                    + (" (facts minus control)" if control_measured is not None else ""))
    scores = {
        name: Scores(values, axes, site, "fact_lookup", config={**common, "effect": name}, provenance=provenance)
        for name, values, axes, site in (
            ("mlp_path", mlp_effects, ("layer",), "mlp"),
            ("head_knockout", head_effects, ("layer", "head"), "head"),
            ("layer_knockout", layer_effects, ("layer",), "attn"),
            ("mlp_paths", path_effects, ("receiver", "layer"), "mlp"),
            ("subject_state", state_effects, ("layer",), "resid_pre"),
        )
    }
    return FactLookup(
        mlps=mlps, heads=heads, extraction_layer=extraction, extraction_layer_source=source,
        mlp_effects=scores["mlp_path"], head_effects=scores["head_knockout"],
        layer_effects=scores["layer_knockout"], paths=scores["mlp_paths"], subject_state=scores["subject_state"],
        control_paths=None if control_measured is None else Scores(
            control_measured["paths"], ("receiver", "layer"), "mlp", "fact_lookup",
            config={**common, "effect": "control_mlp_paths", "contrast": False}, provenance=provenance),
        control_head_effects=None if control_measured is None else Scores(
            control_measured["knockout"][:, :n_heads], ("layer", "head"), "head", "fact_lookup",
            config={**common, "effect": "control_head_knockout", "contrast": False}, provenance=provenance),
        probes_subject=probes_subject, probes_last=probes_last,
        clean_logit_diff=float(clean_ld.mean()), corrupt_logit_diff=float(corrupt_ld.mean()),
        pairs=tuple(pair_list), fact_index=tuple(index), config=cfg,
    )
