"""compare_localizations: one forget case edited through several localisations, then attacked."""

from __future__ import annotations

import math
import random

import pytest

import mechedit
from mechedit.artifacts import ModelMismatchError
from mechedit.circuit import Circuit
from mechedit.components import Component
from mechedit.edit import FinetuneConfig, LogOneMinusP, RetainCE
from mechedit.evaluate import (
    ComparisonConfig,
    ComparisonFormatError,
    LocalizationComparison,
    compare_localizations,
    fact_edit_suites,
)
from mechedit.evaluate.compare import _select
from mechedit.evaluate.robustness import RobustnessConfig
from mechedit.provenance import weights_hash
from mechedit.zoo import load_world
from mechedit.zoo.random_model import random_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setting():
    model, workspace = mechedit.load("factworld"), mechedit.load("factworld")
    world = load_world("factworld")
    born = [f for f in world.facts if f.relation_id == "P19"]
    picked = random.Random(3).sample(born, 20)
    forget, kept = picked[:4], picked[4:]
    case = fact_edit_suites(world, forget, exclude=kept, neighbours_per_fact=2, fluency_texts=world.text_heldout[:20])
    retain = fact_edit_suites(world, kept, neighbours_per_fact=0, case="retain")
    return model, workspace, case, retain


CONFIG = ComparisonConfig(
    finetune=FinetuneConfig((LogOneMinusP(), RetainCE(weight=4.0)), steps=20, batch_size=32, forget_target=0.0, eval_every=2),
    lrs=(1e-3, 3e-3),
    robustness=RobustnessConfig(attacks=("relearn_full",), relearn_steps=5, measures=("choice_accuracy_true",)),
)


@pytest.fixture(scope="module")
def comparison(setting):
    model, workspace, case, retain = setting
    located = Circuit.of(model, [Component("mlp", 0)], method="manual", description="first MLP")
    return compare_localizations(
        model, {"first MLP": located, "all MLPs": "all_mlps"}, case=case, retain=retain,
        config=CONFIG, workspace=workspace, progress=False,
    )


def test_every_localization_forgets_and_models_stay(setting, comparison):
    model, workspace, _, _ = setting
    frame = comparison.to_frame()
    assert list(frame.index) == ["original", "first MLP", "all MLPs"]
    assert frame.loc["original", "forget/efficacy/choice_accuracy_true"] == 1.0
    for name in ("first MLP", "all MLPs"):
        row = frame.loc[name]
        assert row["forget/efficacy/choice_accuracy_true"] <= 0.25  # forgotten
        assert row["retain/efficacy/choice_accuracy_true"] >= 0.9  # kept
        assert row["lr"] in CONFIG.lrs
        assert 0 <= row["relearn_full/efficacy/choice_accuracy_true"] <= 1
    d_mlp, d_model, n_layers = model.cfg.d_mlp, model.cfg.d_model, model.cfg.n_layers
    block = 2 * d_mlp * d_model + d_mlp + d_model  # GPT-2 MLP: c_fc and c_proj, with biases
    assert frame.loc["first MLP", "n_params"] == block
    assert frame.loc["all MLPs", "n_params"] == n_layers * block
    assert weights_hash(model) == weights_hash(workspace) == comparison.model["weights_hash"]
    assert len(comparison.sweep) == 2 * len(CONFIG.lrs)
    headline = comparison.headline()
    assert {"forget", "forget, paraphrases", "retain", "relearn_full", "relearn_full: recovery"} <= set(headline.columns)


def test_selection_rule():
    tried = [
        {"lr": 1e-3, "efficacy_loss": 0.2, "retain_exact": 1.0},
        {"lr": 3e-3, "efficacy_loss": 0.0, "retain_exact": 0.95},
        {"lr": 1e-2, "efficacy_loss": 0.0, "retain_exact": 0.5},
    ]
    assert _select(tried, 0.9)["lr"] == 3e-3  # forgets most among those that keep the retain set
    assert _select(tried, 0.99)["lr"] == 1e-3
    assert _select([dict(t, retain_exact=0.1 * i) for i, t in enumerate(tried)], 0.9)["lr"] == 1e-2  # none keeps: best kept


def test_round_trip(tmp_path, comparison):
    path = comparison.save(tmp_path / "comparison.json")
    back = LocalizationComparison.load(path)
    assert back.to_frame().equals(comparison.to_frame()) or all(
        (a == b) or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
        for a, b in zip(back.to_frame().to_numpy().ravel(), comparison.to_frame().to_numpy().ravel(), strict=True)
    )
    path.write_text(path.read_text().replace('"version": 1', '"version": 7'))
    with pytest.raises(ComparisonFormatError, match="version"):
        LocalizationComparison.load(path)


def test_bad_input(setting, tmp_path):
    model, workspace, case, retain = setting
    kw = {"case": case, "retain": retain, "config": CONFIG, "workspace": workspace, "progress": False}
    with pytest.raises(ValueError, match="non-empty dict"):
        compare_localizations(model, {}, **kw)
    with pytest.raises(ValueError, match="empty circuit"):
        compare_localizations(model, {"none": Circuit(())}, **kw)
    with pytest.raises(ValueError, match="'all'"):
        compare_localizations(model, {"x": "everything"}, **kw)
    with pytest.raises(ValueError, match="workspace is the model itself"):
        compare_localizations(model, {"all": "all"}, **{**kw, "workspace": model})
    with pytest.raises(ValueError, match="also edited prompts"):
        compare_localizations(model, {"all": "all"}, **{**kw, "retain": case})
    with pytest.raises(ValueError, match="FactEditSuites"):
        compare_localizations(model, {"all": "all"}, **{**kw, "retain": list(retain.efficacy)})
    other = mechedit.load(random_checkpoint(tmp_path / "tiny", "gpt2", n_layer=2, n_embd=64, n_head=4))
    foreign = Circuit.of(other, [Component("mlp", 0)], method="manual")
    with pytest.raises(ModelMismatchError):
        compare_localizations(model, {"foreign": foreign}, **kw)
    with pytest.raises(ValueError, match="lrs"):
        ComparisonConfig(finetune=CONFIG.finetune, lrs=())
