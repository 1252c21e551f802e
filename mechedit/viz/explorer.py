"""A notebook explorer of MLP neurons: locate a fact, look at one neuron.

The computation is plain functions, usable in scripts and tests without widgets:

- ``fact_prompt_set`` / ``text_prompt_set``: the prompts one looks at: a fact of the fact world in
  each training template (group ``"fact"``), its held-out paraphrases (``"paraphrase"``) and other
  people with the same value (``"neighbour"``, the facts to keep); or one free prompt and target;
- ``locate_neurons``: ``Scores`` over ``("layer", "neuron")`` by one of ``METHODS``;
- ``neuron_detail``: one neuron's promoted tokens, its activation on every prompt of the set and
  its attribution per prompt, which aggregate (exactly as the locator aggregates them) to the
  locator's score for that neuron; ``NeuronDetail.figure()`` draws it.

``neuron_explorer`` wires them into an ipywidgets panel (person, relation or free prompt, method,
site; a "locate" button that redraws the layer x neuron heatmap with the top neurons marked; a
layer and neuron to inspect, or a click on the heatmap where plotly's ``FigureWidget`` is
available). ipywidgets is imported only there (``pip install 'mechedit[notebooks]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mechedit.components import Component, hook_name
from mechedit.gradients import activations_and_gradients, capture_activations
from mechedit.locate.knowledge_neurons import knowledge_neurons
from mechedit.locate.neuron_attribution import NeuronAttributionConfig, neuron_attribution
from mechedit.metrics import target_logprob
from mechedit.prompts import FactPrompt
from mechedit.scores import Scores
from mechedit.tokens import subject_token_positions, tokenize_facts
from mechedit.unembedding import promoted_tokens
from mechedit.viz.figures import heatmap

__all__ = [
    "METHODS",
    "MLP_SITES",
    "NeuronDetail",
    "NeuronExplorer",
    "PromptSet",
    "fact_prompt_set",
    "locate_neurons",
    "neuron_detail",
    "neuron_detail_figure",
    "neuron_explorer",
    "text_prompt_set",
]

# method -> the MLP sites it scores ("post": mlp.hook_post, after the nonlinearity; "pre": hook_pre)
METHODS: dict[str, tuple[str, ...]] = {
    "neuron_attribution": ("post",),
    "neuron_attribution_subject": ("post",),
    "knowledge_neurons": ("post", "pre"),
}
MLP_SITES = {"post": "neuron", "pre": "neuron_pre"}
GROUPS = ("fact", "paraphrase", "neighbour")
_UNITS = {"neuron_attribution": "nats", "neuron_attribution_subject": "nats", "knowledge_neurons": "probability"}


# ---------------------------------------------------------------------------------------------
# Prompt sets


@dataclass(frozen=True)
class PromptSet:
    """Prompts to locate with and to inspect a neuron on, each in a group.

    ``groups[i]`` is ``"fact"`` (the prompts the locator scores for), ``"paraphrase"`` (held-out
    wordings of the same fact) or ``"neighbour"`` (facts to keep: the retain set of neuron
    attribution). ``title`` names the set in figures.
    """

    prompts: tuple[FactPrompt, ...]
    groups: tuple[str, ...]
    title: str

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.groups):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.groups)} groups: give one group per prompt")
        unknown = sorted(set(self.groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown prompt groups {unknown}; groups are {GROUPS}")
        if "fact" not in self.groups:
            raise ValueError("a prompt set needs at least one 'fact' prompt: the one the neurons are located for")

    @classmethod
    def join(cls, sets: Sequence[PromptSet], title: str) -> PromptSet:
        """Several sets as one (e.g. several facts located together), groups kept."""
        if not sets:
            raise ValueError("nothing to join: give at least one PromptSet")
        return cls(tuple(p for s in sets for p in s.prompts), tuple(g for s in sets for g in s.groups), title)

    def of(self, group: str) -> list[FactPrompt]:
        """The prompts of one group, in order."""
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; groups are {GROUPS}")
        return [p for p, g in zip(self.prompts, self.groups, strict=True) if g == group]


def _relation_id(world: Any, relation: str) -> str:
    by_name = {r.name: r.id for r in world.relations}
    if relation in world.relation:
        return relation
    if relation in by_name:
        return by_name[relation]
    choices = ", ".join(f"{r.id} ({r.name})" for r in world.relations)
    raise ValueError(f"unknown relation {relation!r}; give an id or a name: {choices}")


def fact_prompt_set(world: Any, person: str, relation: str, *, n_neighbours: int = 6) -> PromptSet:
    """One fact of the fact world as a ``PromptSet``.

    ``person``: a person's full name (``"kasim quorvath"``; a trained or a planted person);
    ``relation``: a relation id (``"P641"``) or name (``"sport"``). The set holds the fact in each training template
    (``"fact"``), in each held-out template (``"paraphrase"``), and the first ``n_neighbours``
    other people with the same value in the relation's first template (``"neighbour"``).
    """
    from mechedit.zoo.prompts import fact_prompts
    from mechedit.zoo.world import Fact, fill

    if n_neighbours < 0:
        raise ValueError(f"n_neighbours must be >= 0, got {n_neighbours}")
    people = {p.name: p for p in (*world.people, *world.planted)}
    if person not in people:
        some = ", ".join(p.name for p in world.people[:5])
        raise ValueError(f"unknown person {person!r}: not one of the world's {len(people)} people (e.g. {some})")
    rid = _relation_id(world, relation)
    if rid not in people[person].facts:
        raise ValueError(f"{person} has no {world.relation[rid].name} fact; their facts: {sorted(people[person].facts)}")
    fact = Fact(person, rid, people[person].facts[rid])
    facts = fact_prompts(world, fact)
    paraphrases = fact_prompts(world, fact, heldout=True)
    template = world.relation[rid].train_templates[0]
    neighbours = [
        FactPrompt(prompt=fill(template, f.subject), subject=f.subject, target=f.value, relation_id=rid)
        for f in world.neighbours(fact, limit=n_neighbours)
    ]
    prompts = (*facts, *paraphrases, *neighbours)
    groups = ("fact",) * len(facts) + ("paraphrase",) * len(paraphrases) + ("neighbour",) * len(neighbours)
    return PromptSet(prompts, groups, f"{person}: {world.relation[rid].name} = {fact.value}")


def text_prompt_set(prompt: str, target: str) -> PromptSet:
    """One free prompt and its expected continuation as a ``PromptSet`` (group ``"fact"``, no subject)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the prompt must be non-empty text, got {prompt!r}")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"give the target the prompt should be continued by, got {target!r}")
    return PromptSet((FactPrompt(prompt=prompt.strip(), target=target.strip()),), ("fact",), f"{prompt.strip()!r} -> {target.strip()!r}")


# ---------------------------------------------------------------------------------------------
# Locating


def _check_method(method: str, site: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods are {', '.join(METHODS)}")
    if site not in METHODS[method]:
        raise ValueError(f"{method} scores sites {METHODS[method]}, not {site!r}")


def locate_neurons(
    model: Any,
    prompts: PromptSet,
    method: str = "neuron_attribution",
    *,
    site: str = "post",
    steps: int = 8,
    retain_weight: float = 1.0,
) -> Scores:
    """``Scores`` over ``("layer", "neuron")`` for the set's ``"fact"`` prompts.

    Methods (``METHODS``): ``"neuron_attribution"`` (gradient x activation at every position,
    predicted drop in the target's log-prob when the neuron is zeroed, minus ``retain_weight``
    times the same for the ``"neighbour"`` prompts; nats), ``"neuron_attribution_subject"`` (the
    same summed over the subject's tokens only: the neurons that look the subject up) and
    ``"knowledge_neurons"`` (integrated gradients of the target's probability at the predicting
    position with ``steps`` points; probability units). ``site``: ``"post"`` or ``"pre"``
    (knowledge neurons only).
    """
    _check_method(method, site)
    facts, retain = prompts.of("fact"), prompts.of("neighbour")
    if method == "knowledge_neurons":
        return knowledge_neurons(model, facts, steps=steps, site=site, hook_check=False, progress=False)
    positions = "subject" if method == "neuron_attribution_subject" else "all"
    config = NeuronAttributionConfig(retain_weight=retain_weight, positions=positions)
    return neuron_attribution(model, facts, retain, config=config, progress=False)


# ---------------------------------------------------------------------------------------------
# One neuron


@dataclass(frozen=True, eq=False)
class NeuronDetail:
    """What one neuron does on a prompt set.

    Attributes:
        component: the neuron (site ``"neuron"`` or ``"neuron_pre"``).
        method: the locator whose per-prompt attribution ``frame["attribution"]`` holds.
        promoted: the tokens its output weights promote most through the unembedding
            (``mechedit.unembedding.promoted_tokens``), most first.
        frame: one row per prompt: ``group``, ``prompt``, ``target``, ``p_target`` (the model's
            probability of the target, 0-1), ``activation`` (the neuron's value at the predicting
            position, the prompt's last token), ``subject_activation`` (at the subject's last
            token; NaN without a subject) and ``attribution`` (the method's score of this neuron
            for this prompt alone, in ``unit``).
        score: the attributions aggregated as the locator does (neuron attribution: mean over
            ``"fact"`` minus ``retain_weight`` times mean over ``"neighbour"``; knowledge neurons:
            mean over ``"fact"``), i.e. the locator's ``Scores`` value for this neuron.
        unit: ``"nats"`` or ``"probability"``.
        title: the prompt set's title (shown under the figure's title).
    """

    component: Component
    method: str
    promoted: tuple[str, ...]
    frame: pd.DataFrame
    score: float
    unit: str
    title: str = field(default="")

    def figure(self) -> go.Figure:
        """Two bar rows over the prompts: activation (and at the subject), and attribution per prompt."""
        return neuron_detail_figure(self)


def _component(model: Any, component: Component | tuple[int, int], site: str) -> Component:
    if isinstance(component, tuple):
        if len(component) != 2:
            raise ValueError(f"give a neuron as (layer, neuron), got {component!r}")
        component = Component(MLP_SITES[site], int(component[0]), neuron=int(component[1]))
    if not isinstance(component, Component) or component.site not in ("neuron", "neuron_pre") or component.neuron is None:
        raise ValueError(f"neuron_detail needs an MLP neuron (Component('neuron', layer, neuron=j)), got {component!r}")
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    if not 0 <= int(component.layer) < n_layers:
        raise ValueError(f"layer {component.layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if not 0 <= int(component.neuron) < d_mlp:
        raise ValueError(f"neuron {component.neuron} out of range: each MLP has {d_mlp} neurons (0..{d_mlp - 1})")
    return component


def _subject_last(model: Any, prompts: Sequence[FactPrompt]) -> torch.Tensor:
    """``[batch]`` long: the position of each prompt's last subject token, -1 without a subject."""
    return torch.tensor([subject_token_positions(model, p)[-1] if p.subject is not None else -1 for p in prompts])


def _per_prompt_attribution(model: Any, prompts: Sequence[FactPrompt], component: Component, method: str, steps: int) -> torch.Tensor:
    """``[n_prompts]`` float64: the method's score of ``component`` for each prompt alone."""
    layer, neuron = int(component.layer), int(component.neuron)
    if method == "knowledge_neurons":
        site = "pre" if component.site == "neuron_pre" else "post"
        per = knowledge_neurons(model, list(prompts), steps=steps, site=site, layers=(layer,), per_prompt=True,
                                hook_check=False, progress=False)
        return per.values[:, layer, neuron].double()
    # neuron attribution, one prompt at a time: the predicted drop sum_p a * dlogP/da (module
    # neuron_attribution), with the subject mask for the subject variant
    name = hook_name("neuron", layer)
    batch = tokenize_facts(model, list(prompts))
    tokens = batch.tokens

    def metric(logits):
        return target_logprob(logits, batch.target_ids.to(logits.device), batch.last_positions.to(logits.device)).sum()

    cap = activations_and_gradients(model, tokens, [name], metric)
    acts, grads = cap.activations[name][..., neuron], cap.gradients[name][..., neuron]  # [batch, pos]
    where = torch.ones_like(acts)
    if method == "neuron_attribution_subject":
        where.zero_()
        for row, fact in enumerate(prompts):
            if fact.subject is None:
                raise ValueError(f"{method} needs a subject on every prompt; {fact.prompt!r} has none")
            where[row, list(subject_token_positions(model, fact))] = 1.0
    return (acts * grads * where).sum(1).double().cpu()


def neuron_detail(
    model: Any,
    prompts: PromptSet,
    component: Component | tuple[int, int],
    *,
    method: str = "neuron_attribution",
    site: str = "post",
    steps: int = 8,
    retain_weight: float = 1.0,
    n_tokens: int = 8,
) -> NeuronDetail:
    """One neuron on every prompt of ``prompts``: promoted tokens, activations, attribution per prompt.

    ``component``: a ``Component`` or ``(layer, neuron)`` (read at ``site``: ``"post"`` or
    ``"pre"``). ``method``, ``steps`` and ``retain_weight`` as in ``locate_neurons``, so
    ``NeuronDetail.score`` equals ``locate_neurons(...)`` 's value at this neuron (up to float
    rounding). Costs one forward (and for neuron attribution one backward) pass over the set;
    knowledge neurons integrate over ``steps`` points at this one layer.
    """
    if site not in MLP_SITES:
        raise ValueError(f"site must be one of {tuple(MLP_SITES)}, got {site!r}")
    component = _component(model, component, site)
    site = "pre" if component.site == "neuron_pre" else "post"
    _check_method(method, site)
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    items = list(prompts.prompts)
    layer, neuron = int(component.layer), int(component.neuron)

    name = hook_name(component)
    batch = tokenize_facts(model, items)
    cap = capture_activations(model, batch.tokens, [name])
    rows = torch.arange(len(items))
    last = batch.last_positions.cpu()
    acts = cap.activations[name][..., neuron].float().cpu()  # [batch, pos]
    logp = torch.log_softmax(cap.logits[rows, last.to(cap.logits.device)].float(), -1)
    p_target = logp.gather(-1, batch.target_ids.to(logp.device)[:, None])[:, 0].exp().cpu()
    subject = _subject_last(model, items)
    subject_acts = torch.where(subject >= 0, acts[rows, subject.clamp(min=0)], torch.tensor(float("nan")))

    attribution = _per_prompt_attribution(model, items, component, method, steps)
    in_group = {g: torch.tensor([x == g for x in prompts.groups]) for g in GROUPS}
    score = attribution[in_group["fact"]].mean()
    if method != "knowledge_neurons" and in_group["neighbour"].any() and retain_weight:
        score = score - retain_weight * attribution[in_group["neighbour"]].mean()
    promoted = promoted_tokens(model, [Component("neuron", layer, neuron=neuron)], k=n_tokens)
    frame = pd.DataFrame({
        "group": list(prompts.groups),
        "prompt": [p.prompt for p in items],
        "target": [p.target for p in items],
        "p_target": p_target.tolist(),
        "activation": acts[rows, last].tolist(),
        "subject_activation": subject_acts.tolist(),
        "attribution": attribution.tolist(),
    })
    return NeuronDetail(
        component=component, method=method, promoted=next(iter(promoted.values())), frame=frame,
        score=float(score), unit=_UNITS[method], title=prompts.title,
    )


_GROUP_COLOURS = {"fact": "#4c78a8", "paraphrase": "#72b7b2", "neighbour": "#f58518"}


def neuron_detail_figure(detail: NeuronDetail) -> go.Figure:
    """Bars per prompt (x, labelled ``"<i>: <prompt>"``), coloured by group.

    Row 1: the neuron's activation at the predicting position (bars) and at the subject's last
    token (black diamonds). Row 2: the method's attribution per prompt (``detail.unit``), with the
    aggregated score in the title.
    """
    frame = detail.frame
    labels = [f"{i}: {p if len(p) <= 40 else p[:37] + '...'}" for i, p in enumerate(frame["prompt"])]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=(
        "activation (bars: predicting position; diamonds: subject's last token)",
        f"{detail.method} per prompt ({detail.unit}); aggregated score {detail.score:+.4g}"))
    for group in GROUPS:
        rows = frame.index[frame["group"] == group]
        if not len(rows):
            continue
        x = [labels[i] for i in rows]
        text = [f"{frame.at[i, 'prompt']} -> {frame.at[i, 'target']} (p {frame.at[i, 'p_target']:.2f})" for i in rows]
        colour = _GROUP_COLOURS[group]
        fig.add_bar(x=x, y=frame.loc[rows, "activation"].tolist(), name=group, marker_color=colour, legendgroup=group,
                    text=text, textposition="none", hovertemplate="%{text}<br>activation %{y:.4g}<extra></extra>",
                    row=1, col=1)
        fig.add_bar(x=x, y=frame.loc[rows, "attribution"].tolist(), name=group, marker_color=colour, legendgroup=group,
                    showlegend=False, text=text, textposition="none",
                    hovertemplate="%{text}<br>attribution %{y:.4g}<extra></extra>", row=2, col=1)
    fig.add_scatter(x=labels, y=frame["subject_activation"].tolist(), mode="markers", name="at the subject",
                    marker={"symbol": "diamond", "color": "black", "size": 7},
                    hovertemplate="subject's last token: %{y:.4g}<extra></extra>", row=1, col=1)
    c = detail.component
    fig.update_layout(
        title=f"L{c.layer} {c.site} {c.neuron} promotes: {', '.join(detail.promoted)}" + (f"<br><sup>{detail.title}</sup>" if detail.title else ""),
        height=620, margin={"t": 90, "b": 160}, barmode="relative",  # one bar per prompt: full width
    )
    fig.update_yaxes(title_text="activation", row=1, col=1)
    fig.update_yaxes(title_text=detail.unit, row=2, col=1)
    return fig


# ---------------------------------------------------------------------------------------------
# The widget


def _show(output: Any, figure: Any) -> None:
    """Replace what ``output`` shows by ``figure``; outside IPython (a script, a test) draw nothing."""
    from IPython import get_ipython
    from IPython.display import display

    if get_ipython() is None:
        return
    output.clear_output(wait=True)
    with output:
        display(figure)


def _figure_widget(fig: go.Figure) -> Any:
    """``go.FigureWidget(fig)`` when plotly can make one (it needs anywidget), else ``None``."""
    try:
        return go.FigureWidget(fig)
    except (ImportError, ValueError):
        return None


class NeuronExplorer:
    """The panel ``neuron_explorer`` returns; displays as its ipywidgets ``VBox`` (``.widget``).

    Controls (ipywidgets): ``person``, ``relation`` (dropdowns; absent without a world),
    ``prompt`` and ``target`` (text: a free prompt, used instead of the fact when filled),
    ``method``, ``site`` (dropdowns), ``locate_button``, ``layer`` and ``neuron`` (int fields),
    ``show_button``. State after a run: ``prompt_set``, ``scores`` (the last ``Scores``),
    ``figure`` (the heatmap ``go.Figure`` drawn from them, top ``k`` marked) and ``detail`` (the
    last ``NeuronDetail``). ``locate()`` and ``show_neuron()`` do what the buttons do and raise
    on bad input; the buttons show the error message in the panel instead.
    """

    def __init__(
        self,
        model: Any,
        world: Any = None,
        *,
        methods: Sequence[str] = tuple(METHODS),
        person: str | None = None,
        relation: str | None = None,
        steps: int = 8,
        n_neighbours: int = 6,
        k: int = 24,
        n_tokens: int = 5,
    ) -> None:
        try:
            import ipywidgets as w
        except ImportError as e:  # pragma: no cover - the notebooks extra installs it
            raise ImportError("the explorer needs ipywidgets: pip install 'mechedit[notebooks]'") from e
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        self.model, self.world = model, world
        self.steps, self.n_neighbours, self.k, self.n_tokens = steps, n_neighbours, k, n_tokens
        self.prompt_set: PromptSet | None = None
        self.scores: Scores | None = None
        self.figure: go.Figure | None = None
        self.detail: NeuronDetail | None = None
        self._located: tuple[str, str] = (methods[0], METHODS[methods[0]][0])

        people = [p.name for p in world.people] if world is not None else []
        relations = [(f"{r.name} ({r.id})", r.id) for r in world.relations] if world is not None else []
        if person is not None and person not in people:
            raise ValueError(f"unknown person {person!r}" + ("" if world else ": no world given, use the free prompt"))
        self.person = w.Dropdown(options=people, value=person or (people[0] if people else None), description="person")
        self.relation = w.Dropdown(options=relations, value=_relation_id(world, relation) if relation and world else
                                   (relations[0][1] if relations else None), description="relation")
        self.prompt = w.Text(placeholder="or a free prompt", description="prompt")
        self.target = w.Text(placeholder="its target", description="target")
        self.method = w.Dropdown(options=list(methods), value=methods[0], description="method")
        self.site = w.Dropdown(options=list(METHODS[methods[0]]), description="site")
        self.locate_button = w.Button(description="locate", button_style="primary")
        self.layer = w.BoundedIntText(value=0, min=0, max=model.cfg.n_layers - 1, description="layer")
        self.neuron = w.BoundedIntText(value=0, min=0, max=model.cfg.d_mlp - 1, description="neuron")
        self.show_button = w.Button(description="show neuron")
        self.status = w.HTML()
        self.heatmap_out, self.detail_out = w.Output(), w.Output()
        self._figure_widget: Any = None

        self.method.observe(self._on_method, names="value")
        self.locate_button.on_click(self._on_locate)
        self.show_button.on_click(self._on_show)
        fact_row = [self.person, self.relation] if world is not None else []
        self.widget = w.VBox([
            w.HBox([*fact_row, self.method, self.site]),
            w.HBox([self.prompt, self.target, self.locate_button]),
            self.heatmap_out,
            w.HBox([self.layer, self.neuron, self.show_button]),
            self.status,
            self.detail_out,
        ])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_method(self, change: dict) -> None:
        self.site.options = list(METHODS[change["new"]])

    def current_prompts(self) -> PromptSet:
        """The free prompt when ``prompt`` is filled, else the chosen person's relation."""
        if self.prompt.value.strip():
            return text_prompt_set(self.prompt.value, self.target.value)
        if self.world is None:
            raise ValueError("no world given: type a prompt and its target")
        return fact_prompt_set(self.world, self.person.value, self.relation.value, n_neighbours=self.n_neighbours)

    def locate(self) -> Scores:
        """Recompute the scores for the current choices and redraw the heatmap (top ``k`` marked)."""
        prompts = self.current_prompts()
        scores = locate_neurons(self.model, prompts, self.method.value, site=self.site.value, steps=self.steps)
        top = scores.top_k(self.k, by="abs")
        # a neuron's output weights are the same whichever side of the nonlinearity it is read at
        as_output = {c: Component("neuron", c.layer, neuron=c.neuron) for c in top}
        tokens = promoted_tokens(self.model, as_output.values(), k=self.n_tokens)
        notes = {c: ", ".join(tokens[n]) for c, n in as_output.items()}
        fig = heatmap(scores, mark=top, notes=notes, title=f"{self.method.value} ({self.site.value}): {prompts.title}")
        self.prompt_set, self.scores, self.figure = prompts, scores, fig
        self._located = (self.method.value, self.site.value)
        best = top.components[0]
        self.layer.value, self.neuron.value = int(best.layer), int(best.neuron)
        self._draw_heatmap(fig)
        return scores

    def _draw_heatmap(self, fig: go.Figure) -> None:
        widget = _figure_widget(fig)
        if widget is not None:
            widget.data[0].on_click(self._on_heatmap_click)
        self._figure_widget = widget
        _show(self.heatmap_out, widget if widget is not None else fig)

    def _on_heatmap_click(self, trace: Any, points: Any, _state: Any) -> None:
        # the heatmap's y labels are layers and its x labels neurons (raw order, unbinned)
        if points.xs and points.ys:
            self.layer.value, self.neuron.value = int(points.ys[0]), int(points.xs[0])
            self._on_show(None)

    def show_neuron(self) -> NeuronDetail:
        """Detail of the neuron in ``layer`` / ``neuron`` on the last located prompt set, by the method located with."""
        if self.scores is None or self.prompt_set is None:
            raise ValueError("locate first: the neuron's detail is shown on the located prompt set")
        component = (int(self.layer.value), int(self.neuron.value))
        method, site = self._located
        detail = neuron_detail(self.model, self.prompt_set, component, method=method, site=site,
                               steps=self.steps, n_tokens=self.n_tokens)
        self.detail = detail
        _show(self.detail_out, detail.figure())
        return detail

    def _run(self, action: Any) -> None:
        self.status.value = "<i>working...</i>"
        try:
            action()
        except ValueError as e:
            self.status.value = f"<b style='color:#c53030'>{type(e).__name__}:</b> {e}"
        else:
            self.status.value = ""

    def _on_locate(self, _button: Any) -> None:
        self._run(lambda: (self.locate(), self.show_neuron()))

    def _on_show(self, _button: Any) -> None:
        self._run(self.show_neuron)


def neuron_explorer(model: Any, world: Any = None, **kwargs: Any) -> NeuronExplorer:
    """An ipywidgets panel to locate a fact's neurons and inspect one (see ``NeuronExplorer``).

    ``world``: a fact world (``mechedit.zoo.load_world``) for the person / relation dropdowns;
    without one only the free prompt is offered. Keywords: ``methods`` (a subset of ``METHODS``),
    ``person``, ``relation`` (initial choices), ``steps`` (knowledge neurons' integration points),
    ``n_neighbours``, ``k`` (neurons marked on the heatmap), ``n_tokens`` (promoted tokens shown).
    Display it as a cell's last expression; it needs a live kernel (a saved notebook keeps only
    its text form).
    """
    return NeuronExplorer(model, world, **kwargs)
