"""Linear probes on the residual stream: is a fact's attribute readable at a token, and from which
layer on?

Shared by the fact-lookup locator (where does the subject's last token come to carry its
attributes?) and the robustness evaluation (after an edit, can a probe still read the old
attribute?). Two steps, usable apart:

* ``subject_residuals(model, facts)`` - the residual stream at one token of every fact (by default
  the subject's last token) at every depth: ``Float[depth, fact, d_model]``. Depth ``d < n_layers``
  is ``blocks.{d}.hook_resid_pre`` (the stream *before* block ``d``: depth 0 is the embeddings);
  depth ``n_layers`` is the last block's ``hook_resid_post``.
* ``fit_probes(features, labels, test)`` - one multinomial logistic-regression probe per depth,
  all depths fitted together (one batched L-BFGS problem; the depths' losses are independent),
  on standardised features with an L2 penalty; accuracy on the train and test rows.

``attribute_probes(model, facts)`` does both, labelling each fact by its answer (``target``) and
holding out whole subjects (``split_by_subject``), so a probe cannot pass by memorising a person's
residual vector: it must read the attribute from a person it never saw.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechedit.checks import require_eval_mode
from mechedit.components import check_hook_name
from mechedit.models import model_device
from mechedit.prompts import FactPrompt, facts_with_subjects
from mechedit.tokens import subject_token_positions, tokenize_prompts

__all__ = [
    "ProbeResult",
    "attribute_probes",
    "depth_hook",
    "depth_labels",
    "fit_probes",
    "probe_positions",
    "split_by_subject",
    "subject_residuals",
]

Position = Literal["subject_last", "subject_first", "last"]


def depth_labels(n_layers: int) -> tuple[str, ...]:
    """Names of the ``n_layers + 1`` depths ``subject_residuals`` returns, e.g. for 2 layers
    ``("resid_pre 0", "resid_pre 1", "resid_post 1")``."""
    return (*(f"resid_pre {d}" for d in range(n_layers)), f"resid_post {n_layers - 1}")


def depth_hook(n_layers: int, depth: int) -> str:
    """The hook of depth ``depth`` (``0 .. n_layers``): ``resid_pre`` of block ``depth``, or the last
    block's ``resid_post`` for ``depth == n_layers``."""
    if not 0 <= depth <= n_layers:
        raise ValueError(f"depth must be in 0..{n_layers}, got {depth}")
    return f"blocks.{depth}.hook_resid_pre" if depth < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def probe_positions(model: Any, facts: Sequence[FactPrompt], *, position: Position = "subject_last") -> list[int]:
    """The token position each fact is probed at (BOS counted as the tokenizer adds it).

    ``"subject_last"`` / ``"subject_first"``: the subject's last / first token (the facts need a
    ``subject``); ``"last"``: the prompt's final token, the one that predicts the answer.
    """
    if position not in ("subject_last", "subject_first", "last"):
        raise ValueError(
            f"position must be 'subject_last', 'subject_first' or 'last', got {position!r}"
        )
    if position == "last":
        return tokenize_prompts(model, [f.prompt for f in facts], device="cpu").last_positions.tolist()
    facts = facts_with_subjects(facts, why="probing at the subject reads its token positions")
    spans = [subject_token_positions(model, f) for f in facts]
    return [s[-1] if position == "subject_last" else s[0] for s in spans]


def _grabber(store: dict[str, Tensor], name: str, rows: Tensor, pos: Tensor) -> Any:
    # Keyed by our name: the bridge may report an aliased ``hook.name``.
    def grab(act: Tensor, hook: Any = None) -> None:  # noqa: ARG001
        store[name] = act[rows, pos].detach().float().cpu()

    return grab


def subject_residuals(
    model: Any,
    facts: Sequence[FactPrompt],
    *,
    position: Position = "subject_last",
    batch_size: int = 64,
) -> Float[Tensor, "depth fact d_model"]:
    """The residual stream at one token of each fact, at every depth (see the module notes).

    Args:
        model: a ``TransformerBridge`` in eval mode.
        facts: the prompts; with ``position="subject_last"`` (default) or ``"subject_first"`` each
            needs a ``subject``.
        position: which token (``probe_positions``).
        batch_size: prompts per forward pass.

    Returns:
        ``Float[n_layers + 1, n_facts, d_model]`` on the CPU, float32 (``depth_labels`` names
        the depths).
    """
    require_eval_mode(model, what="subject_residuals")
    if isinstance(facts, FactPrompt) or not isinstance(facts, Sequence) or not len(facts):
        raise ValueError("facts must be a non-empty list of FactPrompt (wrap a single fact: [fact])")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    positions = torch.tensor(probe_positions(model, facts, position=position))
    hooks = [depth_hook(model.cfg.n_layers, d) for d in range(model.cfg.n_layers + 1)]
    for name in hooks:
        check_hook_name(model, name)
    device = model_device(model)
    out = torch.empty(len(hooks), len(facts), model.cfg.d_model)
    for start in range(0, len(facts), batch_size):
        chunk = facts[start : start + batch_size]
        batch = tokenize_prompts(model, [f.prompt for f in chunk], device=device)
        rows = torch.arange(len(chunk), device=device)
        pos = positions[start : start + len(chunk)].to(device)
        grabbed: dict[str, Tensor] = {}

        grabs = [(name, _grabber(grabbed, name, rows, pos)) for name in hooks]
        with torch.no_grad(), model.hooks(fwd_hooks=grabs):
            model(batch.tokens, attention_mask=batch.attention_mask)
        for d, name in enumerate(hooks):
            out[d, start : start + len(chunk)] = grabbed[name]
    return out


def split_by_subject(
    facts: Sequence[FactPrompt], *, test_fraction: float = 0.25, seed: int = 0
) -> Bool[Tensor, " fact"]:
    """A test mask holding out whole subjects: every fact of a held-out subject is a test row.

    Subjects are shuffled with ``seed`` and the first ``round(test_fraction * n_subjects)`` (at
    least one, at most all but one) are held out. Raises ``ValueError`` with fewer than two
    subjects or a fraction outside (0, 1).
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    facts = facts_with_subjects(facts, why="the split holds out whole subjects")
    subjects = sorted({f.subject for f in facts})
    if len(subjects) < 2:
        raise ValueError(
            f"a subject-held-out split needs facts about at least 2 subjects, got {subjects}"
        )
    random.Random(seed).shuffle(subjects)
    n_test = min(max(1, round(test_fraction * len(subjects))), len(subjects) - 1)
    held = set(subjects[:n_test])
    return torch.tensor([f.subject in held for f in facts])


@dataclass(frozen=True)
class ProbeResult:
    """Linear probes, one per depth, and how well they read the labels.

    Attributes:
        classes: the label values, in the order of the probes' outputs.
        depths: one name per depth (``depth_labels``).
        train_accuracy, test_accuracy: ``Float[depth]``, the fraction of train / test rows whose
            highest-scoring class is their label (test rows whose label never occurs in training
            count as wrong).
        chance: the test accuracy of always answering the training rows' most common label.
        weight: ``Float[depth, d_model, class]`` and ``bias``: ``Float[depth, class]``, acting on
            standardised features ``(x - mean) / std``.
        mean, std: ``Float[depth, d_model]``, the training rows' per-feature statistics.
        n_train, n_test: row counts.
    """

    classes: tuple[str, ...]
    depths: tuple[str, ...]
    train_accuracy: Float[Tensor, " depth"]
    test_accuracy: Float[Tensor, " depth"]
    chance: float
    weight: Float[Tensor, "depth d_model cls"]
    bias: Float[Tensor, "depth cls"]
    mean: Float[Tensor, "depth d_model"]
    std: Float[Tensor, "depth d_model"]
    n_train: int
    n_test: int

    def logits(self, features: Float[Tensor, "depth row d_model"]) -> Float[Tensor, "depth row cls"]:
        """Class scores of new rows (e.g. another model's residuals at the same depths)."""
        if features.ndim != 3 or features.shape[0] != len(self.depths) or features.shape[2] != self.mean.shape[1]:
            raise ValueError(
                f"features must be [depth={len(self.depths)}, row, d_model={self.mean.shape[1]}], "
                f"got {tuple(features.shape)}"
            )
        z = (features.float() - self.mean[:, None]) / self.std[:, None]
        return torch.einsum("drm,dmc->drc", z, self.weight) + self.bias[:, None]

    def accuracy(self, features: Float[Tensor, "depth row d_model"], labels: Sequence[str]) -> Float[Tensor, " depth"]:
        """Per-depth accuracy of these (frozen) probes on new rows; unknown labels count as wrong."""
        target = _label_ids(self.classes, labels)
        pred = self.logits(features).argmax(-1)
        return (pred == target[None]).float().mean(1)

    @property
    def best_depth(self) -> int:
        """The depth with the highest test accuracy (the earliest on ties)."""
        return int(torch.argmax(self.test_accuracy))

    def to_frame(self) -> pd.DataFrame:
        """One row per depth: ``depth``, ``train_accuracy``, ``test_accuracy``, ``chance``."""
        return pd.DataFrame(
            {
                "depth": list(self.depths),
                "train_accuracy": self.train_accuracy.tolist(),
                "test_accuracy": self.test_accuracy.tolist(),
                "chance": [self.chance] * len(self.depths),
            }
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able figures (for provenance): accuracies by depth, chance and sizes."""
        return {
            "depths": list(self.depths),
            "train_accuracy": [round(x, 4) for x in self.train_accuracy.tolist()],
            "test_accuracy": [round(x, 4) for x in self.test_accuracy.tolist()],
            "chance": round(self.chance, 4),
            "n_classes": len(self.classes),
            "n_train": self.n_train,
            "n_test": self.n_test,
        }


def _label_ids(classes: Sequence[str], labels: Sequence[str]) -> Int[Tensor, " row"]:
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(lab, -1) for lab in labels], dtype=torch.long)


def fit_probes(
    features: Float[Tensor, "depth row d_model"],
    labels: Sequence[str],
    test: Bool[Tensor, " row"],
    *,
    l2: float = 1e-2,
    max_iter: int = 200,
    depths: Sequence[str] | None = None,
) -> ProbeResult:
    """Fit one multinomial logistic-regression probe per depth on the non-``test`` rows.

    Features are standardised with the training rows' mean and std (so one ``l2`` suits every
    depth, whatever its norm); the loss per depth is the mean cross-entropy plus
    ``l2 * ||W||^2``, minimised by full-batch L-BFGS from zero weights (deterministic).

    Args:
        features: ``Float[depth, row, d_model]`` (``subject_residuals``' output).
        labels: one label per row (strings, e.g. the facts' answers).
        test: ``Bool[row]``, True for held-out rows (``split_by_subject``).
        l2: the weight penalty (>= 0).
        max_iter: L-BFGS iterations.
        depths: names of the depths (default ``"0", "1", ...``).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [depth, row, d_model], got shape {tuple(features.shape)}")
    n_depth, n_row, _ = features.shape
    labels = list(labels)
    test = torch.as_tensor(test, dtype=torch.bool).cpu()
    if len(labels) != n_row or test.shape != (n_row,):
        raise ValueError(
            f"features have {n_row} rows but labels has {len(labels)} and test {tuple(test.shape)}"
        )
    if not test.any() or test.all():
        raise ValueError("test must hold out some rows and keep some for training")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    train = ~test
    classes = tuple(sorted({lab for lab, t in zip(labels, train.tolist(), strict=True) if t}))
    if len(classes) < 2:
        raise ValueError(f"the training rows carry a single label {classes}; a probe needs >= 2")
    y = _label_ids(classes, labels)
    x = features.detach().float().cpu()
    mean = x[:, train].mean(1)
    std = x[:, train].std(1).clamp_min(1e-6)
    z = (x - mean[:, None]) / std[:, None]
    weight = torch.zeros(n_depth, x.shape[2], len(classes), requires_grad=True)
    bias = torch.zeros(n_depth, len(classes), requires_grad=True)
    z_train, y_train = z[:, train], y[train]
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = torch.einsum("drm,dmc->drc", z_train, weight) + bias[:, None]
        # Sum over depths of each depth's mean loss: the depths' problems stay independent.
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, len(classes)), y_train.repeat(n_depth), reduction="none"
        ).reshape(n_depth, -1).mean(1)
        loss = (ce + l2 * weight.pow(2).sum((1, 2))).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight, bias = weight.detach(), bias.detach()
    pred = (torch.einsum("drm,dmc->drc", z, weight) + bias[:, None]).argmax(-1)
    correct = (pred == y[None]).float()
    counts = Counter(lab for lab, t in zip(labels, train.tolist(), strict=True) if t)
    majority = min(classes, key=lambda c: (-counts[c], c))
    chance = sum(1 for lab, t in zip(labels, test.tolist(), strict=True) if t and lab == majority) / int(test.sum())
    return ProbeResult(
        classes=classes,
        depths=tuple(depths) if depths is not None else tuple(str(d) for d in range(n_depth)),
        train_accuracy=correct[:, train].mean(1),
        test_accuracy=correct[:, test].mean(1),
        chance=chance,
        weight=weight,
        bias=bias,
        mean=mean,
        std=std,
        n_train=int(train.sum()),
        n_test=int(test.sum()),
    )


def attribute_probes(
    model: Any,
    facts: Sequence[FactPrompt],
    *,
    position: Position = "subject_last",
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-2,
    batch_size: int = 64,
) -> ProbeResult:
    """Per-depth linear probes reading each fact's answer from the residual stream at ``position``.

    Labels are the facts' ``target`` strings; give facts of one relation (one probe = one
    attribute) or several (then the probe also has to tell the relations apart). Whole subjects
    are held out (``split_by_subject(facts, test_fraction=..., seed=...)``). Returns a
    ``ProbeResult`` whose ``depths`` are ``depth_labels(n_layers)``.
    """
    features = subject_residuals(model, facts, position=position, batch_size=batch_size)
    test = split_by_subject(facts, test_fraction=test_fraction, seed=seed)
    return fit_probes(
        features, [f.target for f in facts], test, l2=l2, depths=depth_labels(model.cfg.n_layers)
    )
