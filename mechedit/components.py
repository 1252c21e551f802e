"""Component addresses: one explicit name for every place mechedit can read, score or edit.

A ``Component`` is a site (what kind of place), a layer, and where the site has units, the index
of one unit (an attention head, an MLP neuron, or one unit of a weight tensor), optionally pinned
to one token position. ``SITES`` is the single table that maps each site to its TransformerBridge
hook name and index axis; every locator, edit and plot goes through it, so supporting a new site
or architecture means editing data here, not ``if`` chains elsewhere.

Sites, with the hook at layer ``l`` and its tensor (``b`` batch, ``p`` positions):

- ``resid_pre``   ``blocks.l.hook_resid_pre``   ``[b, p, d_model]``  residual entering block l
- ``resid_mid``   ``blocks.l.hook_resid_mid``   ``[b, p, d_model]``  residual between attn and MLP
- ``resid_post``  ``blocks.l.hook_resid_post``  ``[b, p, d_model]``  residual leaving block l
- ``attn_out``    ``blocks.l.hook_attn_out``    ``[b, p, d_model]``  attention output (all heads)
- ``mlp_out``     ``blocks.l.hook_mlp_out``     ``[b, p, d_model]``  MLP output
- ``head``        ``blocks.l.attn.hook_z``      ``[b, p, n_heads, d_head]``  one head's mixed values
- ``neuron``      ``blocks.l.mlp.hook_post``    ``[b, p, d_mlp]``  one MLP unit after the activation
- ``neuron_pre``  ``blocks.l.mlp.hook_pre``     ``[b, p, d_mlp]``  one MLP unit before it
- ``attn``        ``blocks.l.hook_attn_out``    ``[b, p, d_model]``  the whole attention block
- ``mlp``         ``blocks.l.hook_mlp_out``     ``[b, p, d_model]``  the whole MLP block
- ``partition``   (no hook)                     one output unit of one weight tensor

The bridge gives every supported architecture these canonical hook names, so the table is
per-bridge, not per-architecture; ``check_hook_name`` / ``validate`` confirm them against a loaded
model's ``hook_dict``.

``attn`` / ``mlp`` name a whole block: activation edits act on its output (the same hook as
``attn_out`` / ``mlp_out``), while weight edits and circuit-restricted fine-tuning take all of the
block's parameters. A ``partition`` names one unit of one parameter tensor (PCGU): ``param`` is
the parameter's plain Hugging Face name (``transformer.h.0.mlp.c_fc.weight``; see
``parameter_names``), as weight edits use, and ``unit`` is an output unit by meaning, not by
storage layout (see ``partition_sizes``); its ``layer`` is optional: the block it belongs to, when
the caller knows it.

Positions index the token axis of the tensor as the model sees it, BOS included (the bridge
prepends BOS by default, so the first prompt word is position 1); negative positions count from
the end (``-1`` is the last token).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from mechedit.hf import LAYOUTS, ArchitectureLayout, hf_parameters


@dataclass(frozen=True)
class SiteSpec:
    """One row of the site table.

    Attributes:
        hook: hook-name template with ``{layer}``; ``None`` for weight-only sites.
        index: the ``Component`` field holding the unit index (``"head"``, ``"neuron"``,
            ``"unit"``), which is also the name of that axis in ``Scores`` (except ``partition``,
            whose scores axis is ``"partition"``); ``None`` when a component is the whole tensor.
        size: the ``model.cfg`` attribute giving the number of units, when fixed by the config.
        kind: ``"activation"`` (a hook tensor), ``"block"`` (a whole block; edited through its
            output hook) or ``"weight"`` (a parameter unit; no hook).
    """

    hook: str | None
    index: str | None
    size: str | None
    kind: str


SITES: Mapping[str, SiteSpec] = MappingProxyType(
    {
        "resid_pre": SiteSpec("blocks.{layer}.hook_resid_pre", None, None, "activation"),
        "resid_mid": SiteSpec("blocks.{layer}.hook_resid_mid", None, None, "activation"),
        "resid_post": SiteSpec("blocks.{layer}.hook_resid_post", None, None, "activation"),
        "attn_out": SiteSpec("blocks.{layer}.hook_attn_out", None, None, "activation"),
        "mlp_out": SiteSpec("blocks.{layer}.hook_mlp_out", None, None, "activation"),
        "head": SiteSpec("blocks.{layer}.attn.hook_z", "head", "n_heads", "activation"),
        "neuron": SiteSpec("blocks.{layer}.mlp.hook_post", "neuron", "d_mlp", "activation"),
        "neuron_pre": SiteSpec("blocks.{layer}.mlp.hook_pre", "neuron", "d_mlp", "activation"),
        "attn": SiteSpec("blocks.{layer}.hook_attn_out", None, None, "block"),
        "mlp": SiteSpec("blocks.{layer}.hook_mlp_out", None, None, "block"),
        "partition": SiteSpec(None, "unit", None, "weight"),
    }
)

# TransformerLens hook spellings people type for a site; used only to suggest the right site.
_SITE_HINTS = {
    "mlp_post": "neuron",
    "hook_post": "neuron",
    "post": "neuron",
    "mlp_pre": "neuron_pre",
    "hook_pre": "neuron_pre",
    "pre": "neuron_pre",
    "z": "head",
    "hook_z": "head",
    "attn_head": "head",
}


def _valid_sites() -> str:
    return ", ".join(SITES)


def site_spec(site: str) -> SiteSpec:
    """The table row of ``site``; a ``ValueError`` lists the valid sites for an unknown one."""
    spec = SITES.get(site) if isinstance(site, str) else None
    if spec is None:
        hint = _SITE_HINTS.get(str(site)) or next(
            iter(difflib.get_close_matches(str(site), SITES, n=1)), None
        )
        did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
        raise ValueError(f"site {site!r} is not known{did_you_mean}; valid sites: {_valid_sites()}")
    return spec


def site_axes(site: str) -> tuple[str, ...]:
    """Named axes that address a site's components: ``("layer",)`` plus its index axis.

    ``neuron`` -> ``("layer", "neuron")``, ``head`` -> ``("layer", "head")``,
    ``resid_pre`` -> ``("layer",)``; ``partition`` -> ``("partition",)`` (one flat axis over all
    parameter units, labelled with ``partition_key``). Add ``"pos"`` for per-position scores.
    """
    spec = site_spec(site)
    if spec.kind == "weight":
        return ("partition",)
    return ("layer",) if spec.index is None else ("layer", spec.index)


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool`` (JSON and Python both let bools pass as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Component:
    """One addressable place in a model.

    Args:
        site: a key of ``SITES``.
        layer: block index, ``0 <= layer < n_layers`` (``None`` only for a partition of a
            parameter outside the blocks, such as the embedding).
        head: attention head index, required for ``site="head"`` and only there.
        neuron: MLP unit index, required for ``neuron`` / ``neuron_pre`` and only there.
        pos: token position (BOS included; negative counts from the end), or ``None`` for
            "wherever the edit or method applies it". Not allowed on ``partition``.
        param: parameter name, required for ``partition`` and only there.
        unit: output unit of ``param``, required for ``partition`` and only there.

    Checked here: the fields the site needs are present, the others are absent, indices are
    non-negative ints. Ranges for a given model are checked by ``validate(model, component)``.
    """

    site: str
    layer: int | None
    head: int | None = None
    neuron: int | None = None
    pos: int | None = None
    param: str | None = None
    unit: int | None = None

    def __post_init__(self) -> None:
        spec = site_spec(self.site)
        where = f"Component(site={self.site!r})"
        if self.layer is None:
            if spec.kind != "weight":
                raise ValueError(f"{where} needs a layer (an int >= 0)")
        elif not is_int(self.layer) or self.layer < 0:
            raise ValueError(f"{where}: layer must be an int >= 0, got {self.layer!r}")
        needed = spec.index
        for name in ("head", "neuron", "unit"):
            value = getattr(self, name)
            if name == needed:
                if not is_int(value) or value < 0:
                    raise ValueError(f"{where} needs {name}= an int >= 0, got {value!r}")
            elif value is not None:
                raise ValueError(
                    f"{where} takes no {name}= (its index is {needed or 'none'}); "
                    f"sites with a {name}: "
                    + ", ".join(s for s, r in SITES.items() if r.index == name)
                )
        if spec.kind == "weight":
            if not isinstance(self.param, str) or not self.param:
                raise ValueError(f"{where} needs param= a parameter name, got {self.param!r}")
            if self.pos is not None:
                raise ValueError(f"{where} is a weight unit and takes no pos=")
        elif self.param is not None:
            raise ValueError(f"{where} takes no param=; only 'partition' names a parameter")
        if self.pos is not None and not is_int(self.pos):
            raise ValueError(f"{where}: pos must be an int or None, got {self.pos!r}")

    @property
    def index(self) -> int | None:
        """The unit index (head, neuron or partition unit), ``None`` for whole-tensor sites."""
        spec = SITES[self.site]
        return getattr(self, spec.index) if spec.index else None

    @property
    def hook_name(self) -> str:
        """The hook this component is read and edited at (``ValueError`` for a partition)."""
        return hook_name(self)

    def at(self, pos: int | None) -> Component:
        """The same component pinned to token position ``pos`` (or unpinned with ``None``)."""
        return Component(self.site, self.layer, self.head, self.neuron, pos, self.param, self.unit)

    def __repr__(self) -> str:
        fields = [repr(self.site), repr(self.layer)]
        for name in ("head", "neuron", "pos", "param", "unit"):
            if getattr(self, name) is not None:
                fields.append(f"{name}={getattr(self, name)!r}")
        return f"Component({', '.join(fields)})"

    def __str__(self) -> str:
        if self.site == "partition":
            text = f"partition {partition_key(self.param, self.unit)}"
        else:
            text = f"L{self.layer} {self.site}"
            if self.index is not None:
                text += f" {self.index}"
        return text if self.pos is None else f"{text} @pos {self.pos}"


def partition_key(param: str, unit: int) -> str:
    """The label of a weight partition, ``"param[unit]"``, as used on a ``"partition"`` axis."""
    return f"{param}[{unit}]"


def parse_partition_key(key: str) -> tuple[str, int]:
    """Inverse of ``partition_key``; ``ValueError`` for anything not shaped ``name[int]``."""
    param, bracket, rest = key.rpartition("[")
    if not bracket or not param or not rest.endswith("]") or not rest[:-1].isdigit():
        raise ValueError(f"partition label {key!r} is not of the form 'param_name[unit]'")
    return param, int(rest[:-1])


def hook_name(component_or_site: Component | str, layer: int | None = None) -> str:
    """The TransformerBridge hook name of a component, or of ``site`` at ``layer``.

    ``hook_name("neuron", 3) == "blocks.3.mlp.hook_post"``. Does not look at a model; use
    ``check_hook_name`` / ``validate`` for that.
    """
    if isinstance(component_or_site, Component):
        site, layer = component_or_site.site, component_or_site.layer
    else:
        site = component_or_site
    spec = site_spec(site)
    if spec.hook is None:
        raise ValueError(
            f"site {site!r} names weights and has no hook; hooked sites: "
            + ", ".join(s for s, r in SITES.items() if r.hook)
        )
    if not is_int(layer) or layer < 0:
        raise ValueError(f"site {site!r} needs a layer (an int >= 0), got {layer!r}")
    return spec.hook.format(layer=layer)


def check_hook_name(model: Any, name: str) -> str:
    """Return ``name`` if it is in ``model.hook_dict``; else a ``ValueError`` with near matches."""
    hooks = model.hook_dict
    if name in hooks:
        return name
    near = difflib.get_close_matches(name, list(hooks), n=5, cutoff=0.6)
    hint = f"; closest: {', '.join(near)}" if near else ""
    raise ValueError(
        f"hook {name!r} is not in this model's hook_dict ({len(hooks)} hooks){hint}. "
        "Build hook names with mechedit.components.hook_name(site, layer)."
    )


def _check_range(what: str, value: int, size: int, unit_name: str) -> None:
    if not 0 <= value < size:
        raise ValueError(
            f"{what} {value} out of range: the model has {size} {unit_name} (0..{size - 1})"
        )


def check_layer(model: Any, layer: int) -> int:
    """Return ``layer`` if ``0 <= layer < n_layers``; else a ``ValueError`` giving the range."""
    n_layers = int(model.cfg.n_layers)
    if not is_int(layer):
        raise ValueError(f"layer must be an int, got {layer!r}")
    _check_range("layer", layer, n_layers, "layers")
    return layer


def index_size(model: Any, site: str) -> int | None:
    """Number of units on ``site``'s index axis for ``model`` (``None`` for whole-tensor sites).

    ``head`` -> ``cfg.n_heads``, ``neuron`` / ``neuron_pre`` -> ``cfg.d_mlp``. Partitions vary by
    parameter: use ``partition_size``.
    """
    spec = site_spec(site)
    return None if spec.size is None else int(getattr(model.cfg, spec.size))


def parameter_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters ``partition`` components name, by name, each parameter once.

    For a TransformerBridge: the plain Hugging Face names (``transformer.h.0.mlp.c_fc.weight``),
    aliases removed, from ``mechedit.hf.hf_parameters`` — the names weight edits and exports use.
    For any other module: its ``named_parameters``. Tied parameters appear once, under their
    canonical name, the first in HF state-dict order: GPT-2's ``transformer.wte.weight`` (not
    ``lm_head.weight``), BERT's ``bert.embeddings.word_embeddings.weight`` and
    ``cls.predictions.bias``; see ``mechedit.hf.hf_tied_names``.
    """
    if hasattr(model, "original_model"):
        return hf_parameters(model)
    return dict(model.named_parameters())


def _owners(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Plain parameter name -> the module that holds it directly (wrapper segments removed)."""
    root = getattr(model, "original_model", model)
    owners: dict[str, torch.nn.Module] = {}
    for name, _ in root.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        plain = ".".join(part for part in name.split(".") if part != "_original_component")
        owners.setdefault(plain, root.get_submodule(owner) if owner else root)
    return owners


def partition_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Number of output units of every parameter in ``parameter_names(model)`` (tied ones once).

    A unit is one output feature of the parameter's layer, whatever the storage layout: a row of
    an ``nn.Linear`` weight ``[out, in]``, a column of a HF GPT-2 ``Conv1D`` weight ``[in, out]``,
    one element of a bias or norm vector, one row (token or position) of an embedding table. For
    an architecture in ``mechedit.hf.LAYOUTS`` the axis comes from that table (the one neuron
    layouts and ``circuit_parameters`` use); for any other module, from its type (``Conv1D``).
    """
    arch = _layout_or_none(model)
    owners = {} if arch is not None else _owners(model)
    sizes = {}
    for name, tensor in parameter_names(model).items():
        if not tensor.ndim:
            sizes[name] = 1
            continue
        if arch is not None:
            axis = arch.output_axis(name, tensor.ndim)
        else:
            # Conv1D stores weights [in, out]: its output units are columns.
            axis = int(isinstance(owners.get(name), Conv1D) and name.endswith(".weight"))
        sizes[name] = int(tensor.shape[axis])
    return sizes


def _layout_or_none(model: torch.nn.Module) -> ArchitectureLayout | None:
    hf = getattr(model, "original_model", model)
    return LAYOUTS.get(type(hf).__name__)


def partition_size(model: torch.nn.Module, param: str) -> int:
    """Number of output units of parameter ``param`` (see ``partition_sizes``)."""
    return _partition_size(partition_sizes(model), param)


def _partition_size(sizes: Mapping[str, int], param: str) -> int:
    if param not in sizes:
        near = difflib.get_close_matches(param, list(sizes), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise ValueError(
            f"parameter {param!r} is not in this model{hint}. "
            "List the names with mechedit.components.parameter_names(model)."
        )
    return sizes[param]


def validate(model: Any, component: Component) -> Component:
    """Check ``component`` against ``model``: hook present, layer/index/position in range.

    Returns the component unchanged; raises ``ValueError`` naming the bad field and the valid
    range (e.g. "layer 9 out of range: the model has 2 layers (0..1)").
    """
    return _validate(model, component, sizes=None)


def _validate(model: Any, component: Component, *, sizes: Mapping[str, int] | None) -> Component:
    if not isinstance(component, Component):
        raise ValueError(f"expected a Component, got {type(component).__name__}")
    spec = SITES[component.site]
    if component.layer is not None:
        check_layer(model, component.layer)
    if spec.kind == "weight":
        size = _partition_size(
            sizes if sizes is not None else partition_sizes(model), component.param
        )
        _check_range(f"unit of {component.param!r}", component.unit, size, "units")
        return component
    check_hook_name(model, hook_name(component))
    size = index_size(model, component.site)
    if size is not None:
        _check_range(spec.index, component.index, size, f"{spec.index}s per layer")
    if component.pos is not None:
        n_ctx = int(model.cfg.n_ctx)
        if not -n_ctx <= component.pos < n_ctx:
            raise ValueError(
                f"pos {component.pos} out of range: the model's context is {n_ctx} tokens "
                f"(positions 0..{n_ctx - 1}, or -{n_ctx}..-1 from the end)"
            )
    return component


def validate_all(model: Any, components: Iterable[Component]) -> None:
    """Validate many components; one ``ValueError`` lists every bad one (the first ten)."""
    components = list(components)
    has_partitions = any(
        isinstance(c, Component) and SITES[c.site].kind == "weight" for c in components
    )
    sizes = partition_sizes(model) if has_partitions else None
    problems = []
    for component in components:
        try:
            _validate(model, component, sizes=sizes)
        except ValueError as err:
            problems.append(f"{component}: {err}")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{len(problems)} component(s) do not fit this model:\n  {shown}{more}")


def all_components(
    model: Any, site: str, *, layers: Iterable[int] | None = None
) -> list[Component]:
    """Every component of ``site`` in ``model`` (all layers, or ``layers``), layer-major order.

    For ``partition`` this enumerates every unit of every parameter (layer ``None``; the block
    index of a parameter is architecture knowledge the PCGU locator supplies).
    """
    spec = site_spec(site)
    if spec.kind == "weight":
        return [
            Component("partition", None, param=name, unit=u)
            for name, size in partition_sizes(model).items()
            for u in range(size)
        ]
    chosen = (
        range(int(model.cfg.n_layers))
        if layers is None
        else [check_layer(model, x) for x in layers]
    )
    if spec.index is None:
        return [Component(site, layer) for layer in chosen]
    size = index_size(model, site)
    return [Component(site, layer, **{spec.index: i}) for layer in chosen for i in range(size)]


__all__ = [
    "SITES",
    "Component",
    "SiteSpec",
    "all_components",
    "check_hook_name",
    "check_layer",
    "hook_name",
    "index_size",
    "parameter_names",
    "parse_partition_key",
    "partition_key",
    "partition_size",
    "partition_sizes",
    "site_axes",
    "site_spec",
    "validate",
    "validate_all",
]
