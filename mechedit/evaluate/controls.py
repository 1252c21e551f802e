"""DEPN beside its controls: is the privacy-neuron edit a real effect or an artefact?

A replication of privacy neurons found random noise on the same neurons did about as well as
DEPN, and knowledge-neuron edits often move probabilities without changing the answer (Niu et al.
2024). ``depn_controls`` therefore measures DEPN's edit next to four controls on the same secrets,
with the same neuron count and the same metrics (``privacy_report``), including answer flips.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
from torch import Tensor

from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit import ablate
from mechedit.evaluate.privacy import answer_flips, privacy_report
from mechedit.locate.depn import depn_select, perturb_neurons, random_neurons, secret_attribution
from mechedit.locate.knowledge_neurons import KnowledgePrompt, knowledge_neurons
from mechedit.models import is_masked_lm
from mechedit.scores import Scores
from mechedit.secrets import as_secrets
from mechedit.tokens import get_tokenizer

__all__ = ["depn_controls"]


def _top(values: Tensor, z: int, site: str, method: str) -> Circuit:
    """The ``z`` highest of ``[layer, neuron]`` values (NaN never chosen) as a neuron circuit."""
    flat = values.nan_to_num(float("-inf")).flatten()
    chosen = flat.topk(z).indices
    d = values.shape[1]
    return Circuit(tuple(Component(site, int(i) // d, neuron=int(i) % d) for i in chosen), method=method)


def depn_controls(
    model: Any,
    secrets: Any,
    *,
    scores: Scores | None = None,
    threshold: float = 0.1,
    top_z: int = 20,
    heldout_texts: Sequence[str] = (),
    facts: Sequence[Any] = (),
    exposure_method: str = "lexicographic",
    el: bool = True,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = False,
) -> pd.DataFrame:
    """DEPN and its controls on the same secrets, in DEPN's Table 1 shape (one row per method).

    Rows (each edits ``top_z`` neurons, zeroed unless stated):

    - ``depn``: DEPN's selection (``depn_select`` at ``threshold`` / ``top_z``);
    - ``random``: as many random neurons (``random_neurons``, ``seed``; DEPN's excluded);
    - ``random_direction``: DEPN's neurons moved by a random vector of the zeroing's norm
      (``perturb_neurons``) instead of zeroed;
    - ``act_x_grad``: the top-z neurons by plain activation x gradient (``secret_attribution``);
    - ``ig_no_vote``: the top-z by IG score summed over the secrets, without DEPN's per-secret
      threshold and votes (Dai's attribution without the aggregation).

    ``scores`` are the per-secret IG scores (``knowledge_neurons(..., per_prompt=True)``);
    ``None`` computes them (``steps``). Columns: ``method``, ``neurons``, ``exposure_before``,
    ``exposure_after`` (bits, ``exposure_method``), ``mrr_*``, ``ma_*``, ``el_3_*`` (causal
    only; ``el=False`` skips EL, the costliest metric), ``extracted_after``, ``flips``, ``perplexity_before`` / ``_after`` (with
    ``heldout_texts``), ``fact_accuracy_*`` (with ``facts``), ``time_s`` (seconds to choose the
    neurons, IG included for ``depn`` / ``ig_no_vote``). ``time_s`` is wall-clock time.
    """
    secrets = as_secrets(secrets)
    ig_time = 0.0
    if scores is None:
        t0 = time.perf_counter()
        scores = knowledge_neurons(
            model, [(s.prefix, s.secret) for s in secrets] if not is_masked_lm(model) else _masked_prompts(model, secrets),
            steps=steps, per_prompt=True, hook_check=False, progress=progress,
        )
        ig_time = time.perf_counter() - t0
    site = scores.site
    t0 = time.perf_counter()
    circuit = depn_select(scores, threshold=threshold, top_z=top_z)
    depn_time = ig_time + time.perf_counter() - t0
    t0 = time.perf_counter()
    no_vote = _top(scores.values.nan_to_num(0.0).sum(0), top_z, site, "ig_no_vote")
    no_vote_time = ig_time + time.perf_counter() - t0
    t0 = time.perf_counter()
    by_grad = _top(secret_attribution(model, secrets, site=site).values, top_z, site, "act_x_grad")
    grad_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    rand = random_neurons(model, circuit, seed=seed, site=site)
    rand_time = time.perf_counter() - t0
    edits = [
        ("depn", circuit, lambda: ablate(model, circuit, mode="zero").applied(model), depn_time),
        ("random", rand, lambda: ablate(model, rand, mode="zero").applied(model), rand_time),
        ("random_direction", circuit, lambda: perturb_neurons(model, circuit, seed=seed), depn_time),
        ("act_x_grad", by_grad, lambda: ablate(model, by_grad, mode="zero").applied(model), grad_time),
        ("ig_no_vote", no_vote, lambda: ablate(model, no_vote, mode="zero").applied(model), no_vote_time),
    ]
    kw = dict(heldout_texts=heldout_texts, facts=facts, exposure_method=exposure_method, el=el, batch_size=batch_size)
    before = privacy_report(model, secrets, **kw)
    rows = []
    for name, chosen, edit, seconds in edits:
        # measured with the edit applied, so the report's "before" column is the edited model
        with edit():
            after = privacy_report(model, secrets, **kw)
        row: dict[str, Any] = {"method": name, "neurons": len(chosen)}
        for key in ("exposure", "mrr", "ma", "el_3", "perplexity", "fact_accuracy"):
            if key in before.metrics:
                row[f"{key}_before"], row[f"{key}_after"] = before.metrics[key][0], after.metrics[key][0]
        row["extracted_after"] = after.metrics["extracted"][0]
        row["flips"] = answer_flips(list(before.per_secret["completion_before"]), list(after.per_secret["completion_before"]))
        row["time_s"] = seconds
        rows.append(row)
    return pd.DataFrame(rows)


def _masked_prompts(model: Any, secrets: Sequence[Any]) -> list[KnowledgePrompt]:
    """Masked-LM knowledge prompts: the prefix, one mask per secret token, then the suffix."""
    mask = get_tokenizer(model).mask_token
    return [
        KnowledgePrompt(" ".join(p for p in (s.prefix, " ".join([mask] * len(s.tokens)), s.suffix) if p), s.secret)
        for s in secrets
    ]
