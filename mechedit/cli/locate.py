"""``mechedit locate METHOD``: score components with one locator, select a circuit, write both.

Each locator is one ``Locator`` entry in ``LOCATORS``: what data it reads (``mechedit.cli.inputs``),
which function runs it and how ``--site`` and ``--set KEY=VALUE`` map onto that function. A new
locator is one more entry here; a name in ``PENDING`` is refused with its message.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mechedit.cli._common import (
    Context,
    UsageError,
    check_new_output,
    emit,
    load_model,
    parse_options,
)

EXAMPLES = """examples:
  mechedit locate neuron-attribution --model factworld --data "factworld:P19:NAME" --top-k 24 --out circuits/name.json
  mechedit locate activation-patching --model factworld --data factworld:P19 --limit 4 --site mlp_out --out circuits/ap.json
  mechedit locate knowledge-neurons --model ./my_gpt2 --data facts.jsonl --set steps=10 --threshold 0.1 --out circuits/kn.json
  mechedit locate pcgu --model factworld --data factworld:bias --set k=64 --out circuits/pcgu.json

--data is a .json/.jsonl/.csv/.parquet file or a fact-world selection (factworld:P19, factworld:P19:NAME,
factworld-planted:planted, factworld:bias, factworld:secrets); see the README's "Command line" section.
Method options go through --set KEY=VALUE (VALUE read as JSON when it parses: --set layers=[0,1]);
they are the keyword arguments of the Python function named in each method's line below."""


@dataclass(frozen=True)
class Located:
    """A locator's outcome: its ``Scores`` (``None`` when the method only selects) and, for
    locators that select themselves (DEPN, PCGU), its ``Circuit``."""

    scores: Any
    circuit: Any = None


@dataclass(frozen=True)
class Locator:
    """How the command line runs one locator.

    Attributes:
        data: the reader in ``mechedit.cli.inputs`` (``facts``, ``pairs``, ``secrets``, ``contrastive``).
        function: ``module:name`` of the Python function (its keyword arguments are the ``--set`` keys).
        config: ``module:name`` of the config dataclass the options fill instead, or ``None``.
        default_site: the ``--site`` used when none is given (``None``: the method has one site).
        selects: the method selects its own circuit (``--top-k`` / ``--threshold`` do not apply).
        run: ``run(model, data, retain, site, options, progress) -> Located``.
        reserved: keyword arguments the command line sets itself.
    """

    data: str
    function: str
    run: Callable[..., Located]
    config: str | None = None
    default_site: str | None = None
    selects: bool = False
    reserved: tuple[str, ...] = ("progress",)
    help: str = ""


def _activation_patching(model, data, retain, site, opts, progress) -> Located:
    from mechedit.locate import activation_patching

    return Located(activation_patching(model, data, site=site, progress=progress, **opts))


def _attribution_patching(model, data, retain, site, opts, progress) -> Located:
    from mechedit.locate import attribution_patching

    return Located(attribution_patching(model, data, sites=(site,), progress=progress, **opts)[site])


_TRACE_KINDS = {"resid_post": "state", "mlp_out": "mlp", "attn_out": "attn"}


def _causal_tracing(model, data, retain, site, opts, progress) -> Located:
    from mechedit.locate import causal_tracing

    if site not in _TRACE_KINDS:
        raise UsageError(f"causal-tracing traces --site {', '.join(_TRACE_KINDS)}; got {site!r}")
    kind = _TRACE_KINDS[site]
    return Located(causal_tracing(model, data, kinds=(kind,), progress=progress, **opts)[kind])


_NEURON_SITES = {"neuron": "post", "neuron_pre": "pre"}


def _neuron_site(site: str, method: str) -> str:
    if site not in _NEURON_SITES:
        raise UsageError(f"{method} scores --site neuron (mlp.hook_post) or neuron_pre; got {site!r}")
    return _NEURON_SITES[site]


def _knowledge_neurons(model, data, retain, site, opts, progress) -> Located:
    from mechedit.locate import knowledge_neurons

    return Located(knowledge_neurons(model, data, site=_neuron_site(site, "knowledge-neurons"), progress=progress, **opts))


def _depn(model, data, retain, site, opts, progress) -> Located:
    from mechedit.locate import depn

    return Located(None, depn(model, data, site=_neuron_site(site, "depn"), progress=progress, **opts))


def _pcgu(model, data, retain, site, opts, progress) -> Located:
    from mechedit.locate import pcgu

    selection = pcgu(model, data, **opts)
    return Located(selection.scores, selection.circuit)


def _neuron_attribution(model, data, retain, site, opts, progress) -> Located:
    from mechedit.locate import NeuronAttributionConfig, neuron_attribution

    return Located(neuron_attribution(model, data, retain or (), config=NeuronAttributionConfig(**opts), progress=progress))


def _fact_lookup(model, data, retain, site, opts, progress) -> Located:
    from mechedit.locate import FactLookupConfig, fact_lookup

    found = fact_lookup(model, data, config=FactLookupConfig(**opts), progress=progress)
    return Located(found.mlp_effects, found.mlps)


LOCATORS: dict[str, Locator] = {
    "activation-patching": Locator(
        "pairs", "mechedit.locate:activation_patching", _activation_patching, default_site="resid_pre",
        reserved=("progress", "site"), help="exact patching of every cell of --site (Scores: layer [x pos] [x unit])",
    ),
    "attribution-patching": Locator(
        "pairs", "mechedit.locate:attribution_patching", _attribution_patching, default_site="head",
        reserved=("progress", "sites"), help="gradient estimate of patching at --site (AtP; --set ig_steps=5 for EAP-IG)",
    ),
    "causal-tracing": Locator(
        "facts", "mechedit.locate:causal_tracing", _causal_tracing, default_site="mlp_out",
        reserved=("progress", "kinds"), help="ROME's causal tracing; --site resid_post|mlp_out|attn_out (facts with subjects)",
    ),
    "knowledge-neurons": Locator(
        "facts", "mechedit.locate:knowledge_neurons", _knowledge_neurons, default_site="neuron",
        reserved=("progress", "site"), help="integrated-gradients knowledge neurons (Dai et al.)",
    ),
    "depn": Locator(
        "secrets", "mechedit.locate:depn", _depn, default_site="neuron", selects=True,
        reserved=("progress", "site"), help="DEPN privacy neurons; selects itself (--set top_z=20 threshold=0.1)",
    ),
    "pcgu": Locator(
        "contrastive", "mechedit.locate:pcgu", _pcgu, config="mechedit.locate:PCGUConfig", selects=True,
        reserved=(), help="PCGU weight partitions from contrastive pairs; selects itself (--set k=...)",
    ),
    "neuron-attribution": Locator(
        "facts", "mechedit.locate:neuron_attribution", _neuron_attribution,
        config="mechedit.locate:NeuronAttributionConfig", help="gradient x activation of MLP neurons (forget vs --retain)",
    ),
    "fact-lookup": Locator(
        "facts", "mechedit.locate:fact_lookup", _fact_lookup, config="mechedit.locate:FactLookupConfig",
        selects=True, help="fact-lookup MLPs (probes, attention knockout, path patching); selects itself "
        "(--set threshold=0.02 extraction_layer=1 min_mlps=1); Scores: MLP path effects",
    ),
}

#: locators being written elsewhere: name -> what to tell a user who asks for one
PENDING: dict[str, str] = {}


def _resolve(dotted: str) -> Any:
    import importlib

    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def check_options(name: str, spec: Locator, options: dict[str, Any]) -> None:
    """Refuse ``--set`` keys the method does not take, before any model is loaded."""
    if spec.config is not None:
        known = {f.name for f in dataclasses.fields(_resolve(spec.config))}
    else:
        params = inspect.signature(_resolve(spec.function)).parameters
        known = {p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    known -= set(spec.reserved)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"{name} takes no option {unknown[0]!r}; its options: {', '.join(sorted(known))}")


def select(scores: Any, args: argparse.Namespace) -> Any:
    """The circuit ``--top-k`` / ``--threshold`` / ``--per-layer`` / ``--by`` pick from ``scores``."""
    if args.threshold is not None:
        return scores.threshold(args.threshold, by=args.by)
    k = 20 if args.top_k is None else args.top_k
    if args.per_layer:
        return scores.top_k_per_layer(k, by=args.by)
    return scores.top_k(k, by=args.by)


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    methods = "\n".join(f"  {n:22s} {s.help} [{s.function.replace(':', '.')}]" for n, s in LOCATORS.items())
    p = sub.add_parser(
        "locate", parents=parents, help="score components with a locator and save Scores + Circuit",
        description="Score model components with one locator, select a circuit, write both.\n\nmethods:\n" + methods,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("method", help="one of: " + ", ".join([*LOCATORS, *PENDING]))
    p.add_argument("--model", required=True, help="a zoo name, a local HF checkpoint folder or a hub id")
    p.add_argument("--data", required=True, help="a prompts file or a fact-world selection (see below)")
    p.add_argument("--retain", help="neuron-attribution: prompts whose answers should stay (same forms as --data)")
    p.add_argument("--limit", type=int, help="use only the first N records / selected facts")
    p.add_argument("--template", type=int, help="fact-world data: only training template K (pairs: default 1)")
    p.add_argument("--site", help="the site to score (default per method: see the list above)")
    p.add_argument("--set", dest="options", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--top-k", type=int, help="select the K best components (default 20)")
    sel.add_argument("--threshold", type=float, help="select every component scoring >= T")
    p.add_argument("--per-layer", action="store_true", help="--top-k per layer")
    p.add_argument("--by", choices=("value", "abs"), default="value", help="rank by score or |score|")
    p.add_argument("--seed", type=int, default=0, help="seed of the fact-world pair partners")
    p.add_argument("--out", required=True, help="the circuit JSON; scores go beside it as <stem>.scores.{json,safetensors}")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    name = args.method
    if name in PENDING:
        raise UsageError(PENDING[name])
    if name not in LOCATORS:
        raise UsageError(f"unknown locator {name!r}; choose one of {', '.join(LOCATORS)}")
    spec = LOCATORS[name]
    if spec.selects and (args.top_k is not None or args.threshold is not None or args.per_layer):
        raise UsageError(f"{name} selects its own circuit; set its rule with --set (see mechedit locate --help)")
    if args.retain is not None and name != "neuron-attribution":
        raise UsageError(f"--retain is for neuron-attribution, not {name}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if not args.out.endswith(".json"):
        raise UsageError(f"--out must name the circuit's .json file, got {args.out!r}")
    options = parse_options(args.options)
    check_options(name, spec, options)
    out = check_new_output(args.out, what="--out", overwrite=args.overwrite)
    scores_stem = out.with_suffix(".scores")
    check_new_output(scores_stem.with_suffix(".scores.json"), what="scores file", overwrite=args.overwrite)

    from mechedit.cli import inputs

    if spec.data == "pairs":
        data = inputs.read_pairs(args.data, limit=args.limit, seed=args.seed, template=args.template)
    elif spec.data == "facts":
        data = inputs.read_facts(args.data, limit=args.limit, template=args.template)
    elif args.template is not None:
        raise UsageError(f"--template applies to fact and pair data, not to {name}'s {spec.data}")
    else:
        data = inputs.READERS[spec.data](args.data, limit=args.limit)
    retain = inputs.read_facts(args.retain) if args.retain is not None else None
    model = load_model(ctx, args.model)
    site = args.site or spec.default_site
    ctx.say(f"locating with {name} on {len(data)} items ...")
    located = spec.run(model, data, retain, site, options, ctx.progress)
    circuit = located.circuit if located.circuit is not None else select(located.scores, args)

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"circuit": str(circuit.save(out))}
    if located.scores is not None:
        paths["scores"] = str(located.scores.save(scores_stem))
    summary = {
        "command": "locate", "method": name, "model": args.model, "data": args.data, "n_items": len(data),
        "site": None if located.scores is None else located.scores.site,
        "n_components": len(circuit), "components": [str(c) for c in circuit][:50], "files": paths,
    }
    emit(ctx, summary, [f"{name}: {len(circuit)} components -> {paths['circuit']}"]
         + ([f"scores -> {paths['scores']}"] if "scores" in paths else []))
    return 0
