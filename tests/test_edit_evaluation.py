"""The fact-edit evaluation: forget and edit cases, teacher-forced vs generated, the report file.

Fact-world tests load the shipped ``factworld`` model once (module scope); the rest run on the
tiny random GPT-2 (word-level tokenizer ``w0..w58``).
"""

from __future__ import annotations

import json

import pytest
import torch

import mechedit
from mechedit import zoo
from mechedit.edit import zero_neurons
from mechedit.evaluate import (
    EditReport,
    EvalRow,
    FactEditSuites,
    ReportFormatError,
    answer_item_scores,
    evaluate_fact_edit,
    fact_edit_suites,
    mc_item,
)
from mechedit.evaluate.facts import REPORT_VERSION
from mechedit.interventions import Intervention, patch
from mechedit.locate import neuron_attribution, random_neurons
from mechedit.metrics import score_continuations
from mechedit.prompts import FactPrompt
from mechedit.provenance import weights_hash
from mechedit.tokens import single_token_id, tokenize_prompts
from mechedit.zoo.world import MC_LETTERS, Fact

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    return zoo.load_world("factworld")


@pytest.fixture(scope="module")
def factworld():
    return mechedit.load("factworld")


def _birth(world, i=0):
    return [f for f in world.facts if f.relation_id == "P19"][i]


def _other_value(world, fact):
    return next(v for v in world.relation[fact.relation_id].values if v != fact.value)


# -- the builder ------------------------------------------------------------------------------


def test_suites_of_an_edit_case_hold_the_right_prompts(world):
    fact, other = _birth(world, 0), _birth(world, 1)
    new = _other_value(world, fact)
    retain = world.neighbours(fact)[:2]
    suites = fact_edit_suites(world, [fact], [new], neighbours_per_fact=3, exclude=retain)
    rel = world.relation["P19"]
    assert suites.case == "edit" and suites.is_edit
    assert [p.prompt for p in suites.efficacy] == [t.replace("{}", fact.subject) for t in rel.train_templates]
    assert [p.prompt for p in suites.paraphrase] == [t.replace("{}", fact.subject) for t in rel.heldout_templates]
    assert {(p.target, p.target_new) for p in suites.efficacy + suites.paraphrase} == {(fact.value, new)}
    # four rotations: the true value at A, B, C, D, the new value one letter later, same options
    mc = suites.multiple_choice
    assert [p.target for p in mc] == list(MC_LETTERS)
    assert [p.target_new for p in mc] == [MC_LETTERS[(k + 1) % 4] for k in range(4)]
    for p in mc:
        if world.config.mc_layout == "letter-after":  # q : v1 A v2 B v3 C v4 D . <template>
            listed = p.prompt.split(" . ")[0].removeprefix("q : ").split()
            options = dict(zip(listed[1::2], listed[0::2], strict=True))
        else:  # q : <question> A v1 B v2 C v3 D v4 answer :
            listed = p.prompt.split(" answer :")[0].split("? ")[1].split()
            options = dict(zip(listed[0::2], listed[1::2], strict=True))
        assert options[p.target] == fact.value and options[p.target_new] == new
    # neighbours: same relation and value, not the retain set, three people, carrying the new value
    people = {p.subject for p in suites.neighbourhood}
    assert len(people) == 3 and fact.subject not in people
    assert not people & {f.subject for f in retain}
    assert {(p.target, p.target_new) for p in suites.neighbourhood} == {(fact.value, new)}
    # the same person's five other relations, never the edited one, no new answer
    assert {p.relation_id for p in suites.same_subject} == set(world.relation) - {"P19"}
    assert {p.subject for p in suites.same_subject} == {fact.subject}
    assert all(p.target_new is None for p in suites.same_subject)
    assert suites.fluency == world.text_heldout
    # candidates for renormalised accuracy: the relation's values (a new value from elsewhere added)
    assert suites.efficacy[0].candidates == rel.values
    outside = fact_edit_suites(world, [fact], ["violin"], neighbours_per_fact=0, candidates=False)
    assert outside.efficacy[0].candidates is None and outside.paraphrase[0].target_new == "violin"
    assert fact_edit_suites(world, [fact], ["violin"]).efficacy[0].candidates == (*rel.values, "violin")
    # a forget case of two people: no new answers anywhere, the other edited person no neighbour
    forget = fact_edit_suites(world, [fact, other], mc_rotations=False)
    assert forget.case == "forget" and not forget.is_edit
    assert all(p.target_new is None for name in ("efficacy", "paraphrase", "multiple_choice") for p in getattr(forget, name))
    assert len(forget.multiple_choice) == 2
    assert not {p.subject for p in forget.neighbourhood} & {fact.subject, other.subject}
    assert forget.facts == ({"subject": fact.subject, "relation_id": "P19", "value": fact.value, "new_value": None},
                            {"subject": other.subject, "relation_id": "P19", "value": other.value, "new_value": None})


def test_builder_and_suites_refuse_bad_input(world):
    fact = _birth(world)
    with pytest.raises(ValueError, match=rf"new_values\[0\] is '{fact.value}', the fact's current value.*new_values=None"):
        fact_edit_suites(world, [fact], [fact.value])
    with pytest.raises(ValueError, match="no person 'nobody atall'"):
        fact_edit_suites(world, [Fact("nobody atall", "P19", "paris")])
    wrong = Fact(fact.subject, "P19", _other_value(world, fact))
    with pytest.raises(ValueError, match=rf"not in this world: '{fact.subject}' has P19 = '{fact.value}'"):
        fact_edit_suites(world, [wrong])
    with pytest.raises(ValueError, match="1 facts but 2 new_values"):
        fact_edit_suites(world, [fact], ["rome", "oslo"])
    with pytest.raises(ValueError, match="not one fact"):
        fact_edit_suites(world, fact)
    with pytest.raises(ValueError, match="duplicates"):
        fact_edit_suites(world, [fact, fact])
    # MC: a question without the true value, an edit whose new answer is not offered
    import random

    blind = world.mc_question(fact, random.Random(0), "train", without_value=True)
    with pytest.raises(ValueError, match="lack the true value"):
        mc_item(blind)
    question = world.mc_question(fact, random.Random(0), "train")
    absent = next(v for v in world.relation["P19"].values if v not in question.options)
    with pytest.raises(ValueError, match=f"new answer '{absent}' is not among the options"):
        mc_item(question, new_value=absent)
    with pytest.raises(ValueError, match="is the true value"):
        mc_item(question, new_value=fact.value)
    # hand-built suites: forget and edit prompts mixed, MC without letters, no efficacy
    plain = FactPrompt(prompt="w1 w2", target="w3")
    new = FactPrompt(prompt="w1 w2", target="w3", target_new="w4")
    with pytest.raises(ValueError, match="some efficacy/paraphrase/multiple_choice prompts carry a target_new"):
        FactEditSuites(efficacy=(new,), paraphrase=(plain,))
    with pytest.raises(ValueError, match=r"multiple_choice\[0\] has no candidates"):
        FactEditSuites(efficacy=(plain,), multiple_choice=(plain,))
    with pytest.raises(ValueError, match="efficacy is empty"):
        FactEditSuites(efficacy=())
    assert FactEditSuites(efficacy=[new]).case == "edit"


# -- teacher-forced vs generated, on a constructed case ---------------------------------------------


def _greedy(model, prompt: str, steps: int) -> list[str]:
    tok = model.tokenizer
    text = prompt
    out = []
    for _ in range(steps):
        batch = tokenize_prompts(model, [text])
        with torch.no_grad():
            nxt = int(model(batch.tokens)[0, -1].argmax())
        word = tok.convert_ids_to_tokens(nxt)
        out.append(word)
        text = f"{text} {word}"
    return out


def test_teacher_forced_and_generated_agree_and_disagree_where_defined(tiny_bridge):
    model, prompt = tiny_bridge, "w1 w2 w3"
    greedy = _greedy(model, prompt, 3)
    # a wrong first token, then what the model itself continues with after it
    first = next(f"w{i}" for i in range(5, 59) if f"w{i}" != greedy[0])
    diverted = [first, *_greedy(model, f"{prompt} {first}", 2)]
    answers = [" ".join(greedy), " ".join(diverted), greedy[0]]
    scores = answer_item_scores(model, [prompt] * 3, answers)
    assert scores.n_tokens.tolist() == [3, 3, 1]
    # the greedy answer: both measures say yes
    assert scores.exact[0] and scores.token_accuracy[0] == 1 and scores.rank[0] == 1
    # the diverted answer: teacher forcing credits the two tokens after the wrong first one,
    # generation produces none of it
    assert not scores.exact[1]
    assert scores.token_accuracy[1].item() == pytest.approx(2 / 3)
    assert scores.rank[1] > 1
    assert scores.exact[2] and scores.token_accuracy[2] == 1
    # the summed log-probability equals one teacher-forced pass over prompt + answer
    reference = score_continuations(model, [prompt] * 3, answers).total
    assert torch.allclose(scores.logprob, reference, atol=1e-5)
    assert torch.allclose(scores.p, reference.exp(), atol=1e-6)


def test_a_no_op_edit_changes_nothing_and_rows_name_case_and_measure(tiny_bridge, tmp_path):
    model = tiny_bridge
    greedy = _greedy(model, "w4 w5", 2)
    suites = FactEditSuites(
        efficacy=(FactPrompt(prompt="w4 w5", target=" ".join(greedy), target_new="w7 w8"),),
        neighbourhood=(FactPrompt(prompt="w9 w10", target="w11", target_new="w7 w8"),),
        same_subject=(FactPrompt(prompt="w12 w13", target="w14"),),
        fluency=("w1 w2 w3 w4", "w5 w6 w7"),
    )
    report = evaluate_fact_edit(model, edit=lambda: torch.no_grad(), suites=suites,
                                edited=[FactPrompt(prompt="w1 w2", target="w3")])
    frame = report.to_frame()
    assert (frame["before"] == frame["after"]).all()
    assert list(frame.columns) == ["case", "suite", "measure", "metric", "before", "after", "change", "n"]
    assert set(frame["case"]) == {"edit", ""}
    assert report.get("efficacy", "exact_true", case="edit").after == 1.0
    assert report.get("efficacy", "exact_new", case="edit").measure == "generated"
    assert report.get("efficacy", "token_accuracy_true", case="edit").measure == "teacher_forced"
    assert report.get("efficacy", "p_target").case == ""  # the legacy row, still reachable as before
    assert not any(r.metric.endswith("_new") for r in report.rows if r.suite == "same_subject")
    assert report.get("fluency", "perplexity", case="edit").n == 2
    assert report.context["cases"]["edit"]["sizes"]["neighbourhood"] == 1
    with pytest.raises(KeyError, match="2 rows .pass case= or measure="):
        EditReport(report.rows + report.rows[:1], {}).get(report.rows[0].suite, report.rows[0].metric)
    with pytest.raises(KeyError, match="no row for efficacy/p_true"):
        report.get("efficacy", "p_true", case="forget")
    with pytest.raises(ValueError, match="distinct labels"):
        evaluate_fact_edit(model, edit=lambda: torch.no_grad(), suites=[suites, suites])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_fact_edit(model, edit=lambda: torch.no_grad())


# -- the report file ------------------------------------------------------------------------------


def test_report_round_trips_and_refuses_bad_files(tmp_path):
    report = EditReport(
        (
            EvalRow("efficacy", "p_true", 0.9, 0.1, 7, "forget", "teacher_forced"),
            EvalRow("efficacy", "exact_true", 1.0, 0.0, 7, "forget", "generated"),
            EvalRow("fluency", "perplexity", 4.9, float("inf"), 300, "forget", "teacher_forced"),
            EvalRow("efficacy", "p_target", 0.9, 0.2, 7),
        ),
        {"cases": {"forget": {"facts": [], "sizes": {"efficacy": 7}}}},
    )
    path = report.save(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["version"] == REPORT_VERSION == 2
    again = EditReport.load(path)
    assert again.rows == report.rows and again.context == report.context
    assert again.to_frame().equals(report.to_frame())
    # a version-1 file (rows without case/measure) still loads, as legacy rows
    v1 = {**data, "version": 1, "rows": [{k: v for k, v in r.items() if k not in ("case", "measure")} for r in data["rows"]]}
    path.write_text(json.dumps(v1))
    assert [(r.case, r.measure) for r in EditReport.load(path).rows] == [("", "")] * 4
    for change, message in [
        ({"version": 7}, "unsupported version"),
        ({"format": "mechedit.circuit"}, "format"),
        ({"rows": [{k: v for k, v in data["rows"][0].items() if k != "case"}]}, r"rows\[0\]: missing \['case'\]"),
        ({"rows": [{**data["rows"][0], "measure": "sampled"}]}, r"rows\[0\]\['measure'\] is 'sampled'"),
        ({"rows": [{**data["rows"][0], "case": 3}]}, r"rows\[0\]\['case'\] must be str"),
    ]:
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(ReportFormatError, match=message):
            EditReport.load(path)


# -- real edits on the fact world ---------------------------------------------------------------


def test_zeroing_located_neurons_forgets_and_random_neurons_do_not(factworld, world):
    model = factworld
    fact = _birth(world)
    retain = world.neighbours(fact)[:12]
    suites = fact_edit_suites(world, [fact], exclude=retain, neighbours_per_fact=6, fluency_texts=world.text_heldout[:60])
    retain_prompts = [p for f in retain for p in fact_edit_suites(world, [f], neighbours_per_fact=0).efficacy]
    # 12 neurons: measured on this factworld (k: same-subject / neighbourhood exact after zeroing):
    # 8, 12: 1.00 / 1.00; 16: 1.00 / 0.98; 24: 0.83 / 0.88; 48: 0.60 / 0.52 - the fact gone at every k
    circuit = neuron_attribution(model, list(suites.efficacy), retain_prompts, progress=False).top_k(12)
    base = weights_hash(model)
    located = evaluate_fact_edit(model, edit=zero_neurons(model, circuit), suites=suites)
    control = evaluate_fact_edit(model, edit=zero_neurons(model, random_neurons(model, circuit, seed=0)), suites=suites)
    assert weights_hash(model) == base

    def row(report, suite, metric):
        return report.get(suite, metric, case="forget")

    for suite in ("efficacy", "paraphrase"):
        assert row(located, suite, "exact_true").before == 1.0
        assert row(located, suite, "exact_true").after <= 0.15, suite
        assert row(located, suite, "p_true").change < -0.5, suite
        assert row(located, suite, "mrr_true").after < 0.6
        assert row(located, suite, "choice_accuracy_true").after < row(located, suite, "choice_accuracy_true").before == 1.0
        assert row(control, suite, "exact_true").after == 1.0
        assert abs(row(control, suite, "p_true").change) < 0.05
    # the same person's other facts survive; perplexity barely moves
    assert row(located, "same_subject", "exact_true").after >= 0.9
    assert row(located, "fluency", "perplexity").after == pytest.approx(row(located, "fluency", "perplexity").before, rel=0.02)
    # multiple choice (the true value at A, B, C, D): answered before, gone with the fact; the
    # random neurons leave it
    mc = row(located, "multiple_choice", "choice_accuracy_true")
    assert mc.n == 4 and mc.before == 1.0 and mc.after <= 0.25
    assert row(control, "multiple_choice", "choice_accuracy_true").after == 1.0


def test_an_edit_case_sees_the_new_answer_come_and_leak_to_neighbours(factworld, world):
    model = factworld
    fact = _birth(world)
    new = _other_value(world, fact)
    suites = fact_edit_suites(world, [fact], [new], neighbours_per_fact=3, fluency_texts=world.text_heldout[:40])
    # a crude, unlocalised edit: push the last residual stream from the old answer to the new one
    layer = model.cfg.n_layers - 1
    direction = (model.W_U[:, single_token_id(model, new)] - model.W_U[:, single_token_id(model, fact.value)]).detach()
    steer = Intervention(f"blocks.{layer}.hook_resid_post", "add", source=20 * direction, source_shape="token", positions=-1)
    report = evaluate_fact_edit(model, edit=lambda: patch(model, [steer]), suites=suites)

    def row(suite, metric):
        return report.get(suite, metric, case="edit")

    for suite in ("efficacy", "paraphrase"):
        assert row(suite, "exact_new").before == 0.0 and row(suite, "exact_new").after == 1.0
        assert row(suite, "new_beats_true").after == 1.0
        assert row(suite, "exact_true").after == 0.0
    # the edit is not about this person: the neighbourhood flips too, and the report shows it
    assert row("neighbourhood", "new_beats_true").before == 0.0
    assert row("neighbourhood", "new_beats_true").after >= 0.9
    # MC: the new value is an option in every question; both letters are scored
    assert row("multiple_choice", "choice_accuracy_new").n == 4
