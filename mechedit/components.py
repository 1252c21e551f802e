"""Component addresses: one explicit name for every place mechedit can read, score or edit.

A ``Component`` is a site (what kind of place), a layer, and where the site has units, the index
of one unit (an attention head, an MLP neuron, or one unit of a weight tensor), optionally pinned
to one token position. ``SITES`` is the single table that maps each site to its TransformerBridge
hook name, its index axis and its tensor layout; ``ARCHITECTURES`` says, per Hugging Face
architecture, which of them exist and why the others do not. Every locator, edit and plot goes
through these two tables, so supporting a new site or architecture means editing data here, not
``if`` chains elsewhere.

Sites, with the hook at layer ``l`` and its tensor (``b`` batch, ``p`` positions, ``h`` heads):

- ``embed``       ``hook_embed``                ``[b, p, d_model]``  token embeddings (layer 0)
- ``pos_embed``   ``hook_pos_embed``            ``[b, p, d_model]``  learned position embeddings
  (layer 0; only where the architecture has a position table: GPT-2, BERT)
- ``resid_pre``   ``blocks.l.hook_resid_pre``   ``[b, p, d_model]``  residual entering block l
- ``resid_mid``   ``blocks.l.hook_resid_mid``   ``[b, p, d_model]``  residual between attn and MLP
  (not on parallel-attention architectures such as GPT-NeoX)
- ``resid_post``  ``blocks.l.hook_resid_post``  ``[b, p, d_model]``  residual leaving block l
- ``attn_out``    ``blocks.l.hook_attn_out``    ``[b, p, d_model]``  attention output (all heads)
- ``mlp_out``     ``blocks.l.hook_mlp_out``     ``[b, p, d_model]``  MLP output
- ``q``/``k``/``v`` ``blocks.l.attn.hook_q`` ... ``[b, p, h, d_head]``  one head's query / key /
  value (after rotary embedding where the architecture rotates them inside the HF module)
- ``pattern``     ``blocks.l.attn.hook_pattern`` ``[b, h, p, key_pos]``  one head's attention
  probabilities (post-softmax; note the head axis is dim 1 and ``pos`` is the query position)
- ``head``        ``blocks.l.attn.hook_z``      ``[b, p, h, d_head]``  one head's mixed values
- ``neuron``      ``blocks.l.mlp.hook_post``    ``[b, p, d_mlp]``  one MLP unit after the activation
  (for gated MLPs, ``act(gate) * up``: what the output projection reads)
- ``neuron_pre``  ``blocks.l.mlp.hook_pre``     ``[b, p, d_mlp]``  one MLP unit before it
- ``attn``        ``blocks.l.hook_attn_out``    ``[b, p, d_model]``  the whole attention block
- ``mlp``         ``blocks.l.hook_mlp_out``     ``[b, p, d_model]``  the whole MLP block
- ``partition``   (no hook)                     one output unit of one weight tensor

``embed`` and ``pos_embed`` are computed once, before the blocks; their layer is always 0 (they
enter block 0's residual), so every hooked component keeps an int layer and ``Scores`` over them
keep a ``layer`` axis (of size 1) like every other activation site.

The bridge gives every supported architecture these canonical hook names, but a name in
``hook_dict`` does not mean the architecture computes it (GPT-NeoX and Llama list
``hook_pos_embed`` and never fire it): ``available_sites(model)`` / ``require_site`` read
``ARCHITECTURES``, and ``check_hook_name`` / ``validate`` confirm hooks against a loaded model's
``hook_dict``. The per-head query/key/value *inputs* (``attn.hook_q_input`` ...) are not sites:
the bridge only computes them after ``model.set_use_split_qkv_input(True)``, which changes every
layer's forward.

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
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from mechedit.hf import LAYOUTS, ArchitectureLayout, hf_parameters

RESID_DIMS = ("batch", "pos", "d_model")
HEAD_DIMS = ("batch", "pos", "head", "d_head")
PATTERN_DIMS = ("batch", "head", "pos", "key_pos")
MLP_DIMS = ("batch", "pos", "neuron")


@dataclass(frozen=True)
class SiteSpec:
    """One row of the site table.

    Attributes:
        hook: hook-name template, with ``{layer}`` for per-block sites (``"hook_embed"`` has
            none: it is computed once); ``None`` for weight-only sites.
        index: the ``Component`` field holding the unit index (``"head"``, ``"neuron"``,
            ``"unit"``), which is also the name of that axis in ``Scores`` (except ``partition``,
            whose scores axis is ``"partition"``); ``None`` when a component is the whole tensor.
        size: the ``model.cfg`` attribute giving the number of units, when fixed by the config
            (``n_key_value_heads`` falls back to ``n_heads`` when the config has no grouped
            keys and values).
        kind: ``"activation"`` (a hook tensor), ``"block"`` (a whole block; edited through its
            output hook) or ``"weight"`` (a parameter unit; no hook).
        dims: the hook tensor's axes by name, e.g. ``("batch", "pos", "head", "d_head")``;
            ``pos`` is the (query) token axis and ``index`` names the unit axis. Empty for
            weight sites.
    """

    hook: str | None
    index: str | None
    size: str | None
    kind: str
    dims: tuple[str, ...] = ()

    @property
    def per_layer(self) -> bool:
        """True for sites with one hook per block; False for ``embed``/``pos_embed`` (layer 0)."""
        return self.hook is not None and "{layer}" in self.hook

    @property
    def unit_dim(self) -> int | None:
        """The axis of the hook tensor that ``index`` addresses (``None`` for whole tensors)."""
        return self.dims.index(self.index) if self.index and self.index in self.dims else None

    @property
    def pos_dim(self) -> int | None:
        """The token (query position) axis of the hook tensor."""
        return self.dims.index("pos") if "pos" in self.dims else None


SITES: Mapping[str, SiteSpec] = MappingProxyType(
    {
        "resid_pre": SiteSpec("blocks.{layer}.hook_resid_pre", None, None, "activation", RESID_DIMS),
        "resid_mid": SiteSpec("blocks.{layer}.hook_resid_mid", None, None, "activation", RESID_DIMS),
        "resid_post": SiteSpec("blocks.{layer}.hook_resid_post", None, None, "activation", RESID_DIMS),
        "attn_out": SiteSpec("blocks.{layer}.hook_attn_out", None, None, "activation", RESID_DIMS),
        "mlp_out": SiteSpec("blocks.{layer}.hook_mlp_out", None, None, "activation", RESID_DIMS),
        "head": SiteSpec("blocks.{layer}.attn.hook_z", "head", "n_heads", "activation", HEAD_DIMS),
        "neuron": SiteSpec("blocks.{layer}.mlp.hook_post", "neuron", "d_mlp", "activation", MLP_DIMS),
        "neuron_pre": SiteSpec("blocks.{layer}.mlp.hook_pre", "neuron", "d_mlp", "activation", MLP_DIMS),
        "attn": SiteSpec("blocks.{layer}.hook_attn_out", None, None, "block", RESID_DIMS),
        "mlp": SiteSpec("blocks.{layer}.hook_mlp_out", None, None, "block", RESID_DIMS),
        "partition": SiteSpec(None, "unit", None, "weight"),
        "embed": SiteSpec("hook_embed", None, None, "activation", RESID_DIMS),
        "pos_embed": SiteSpec("hook_pos_embed", None, None, "activation", RESID_DIMS),
        "q": SiteSpec("blocks.{layer}.attn.hook_q", "head", "n_heads", "activation", HEAD_DIMS),
        "k": SiteSpec("blocks.{layer}.attn.hook_k", "head", "n_key_value_heads", "activation", HEAD_DIMS),
        "v": SiteSpec("blocks.{layer}.attn.hook_v", "head", "n_key_value_heads", "activation", HEAD_DIMS),
        "pattern": SiteSpec(
            "blocks.{layer}.attn.hook_pattern", "head", "n_heads", "activation", PATTERN_DIMS
        ),
    }
)


@dataclass(frozen=True)
class ArchitectureSites:
    """What one Hugging Face architecture computes, as the site table sees it.

    Attributes:
        name: a readable name for messages (``"GPT-NeoX"``).
        residual: how a block updates the residual stream: ``"sequential"`` (pre-LayerNorm,
            ``resid_mid = resid_pre + attn_out``, ``resid_post = resid_mid + mlp_out``),
            ``"parallel"`` (attention and MLP both read ``resid_pre``:
            ``resid_post = resid_pre + attn_out + mlp_out``; no ``resid_mid``) or ``"post_ln"``
            (BERT: a LayerNorm after each sum, so the residual is not a plain sum of outputs).
        parallel_flag: a HF config attribute that, when true, makes the block ``"parallel"``
            instead of ``residual`` (GPT-NeoX's ``use_parallel_residual``); ``None`` if fixed.
        missing: sites the architecture does not compute, with the reason (shown in errors).
        edit_caveats: sites that read correctly but whose hook, when edited (or differentiated),
            does not act on everything the name suggests, with the explanation. Measured with
            ``mechedit.checks.check_hooks``'s edited runs.
    """

    name: str
    residual: str
    parallel_flag: str | None = None
    missing: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    edit_caveats: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.residual not in ("sequential", "parallel", "post_ln"):
            raise ValueError(f"residual must be sequential, parallel or post_ln, got {self.residual!r}")
        unknown = [s for s in self.missing if s not in SITES]
        if unknown:
            raise ValueError(f"missing names unknown sites {unknown}")

    def residual_form(self, config: Any) -> str:
        """``residual``, or ``"parallel"`` when ``parallel_flag`` is set and true in ``config``."""
        if self.parallel_flag and getattr(config, self.parallel_flag, False):
            return "parallel"
        return self.residual

    def missing_sites(self, config: Any) -> dict[str, str]:
        """Site -> why this architecture (with this config) does not compute it."""
        missing = dict(self.missing)
        if self.residual_form(config) == "parallel":
            missing["resid_mid"] = (
                f"{self.name} computes attention and MLP in parallel from the same residual, so "
                "there is no residual between them (no resid_mid); use resid_pre / resid_post"
            )
        return missing


_MLP_INPUT_ONLY = (
    "{name}'s bridge places hook_resid_mid on the MLP's LayerNorm input (ln2.hook_in): reading it "
    "gives the residual between attention and MLP, but an edit there (and so the gradient "
    "there) reaches only the MLP, not the residual stream that resid_post adds mlp_out to; "
    "edit resid_pre / attn_out / resid_post instead, or add the resid_post gradient for the "
    "total derivative"
)

_ROTARY = (
    "{name} encodes positions by rotating queries and keys inside attention (rotary "
    "embeddings); it has no position-embedding table, so there is no pos_embed"
)

# Keyed by HF architecture (the model class name, as in config.json's "architectures").
ARCHITECTURES: Mapping[str, ArchitectureSites] = MappingProxyType(
    {
        "GPT2LMHeadModel": ArchitectureSites(
            "GPT-2",
            "sequential",
            edit_caveats=MappingProxyType({"resid_mid": _MLP_INPUT_ONLY.format(name="GPT-2")}),
        ),
        "GPTNeoXForCausalLM": ArchitectureSites(
            "GPT-NeoX",
            "sequential",
            parallel_flag="use_parallel_residual",
            missing=MappingProxyType({"pos_embed": _ROTARY.format(name="GPT-NeoX")}),
        ),
        "LlamaForCausalLM": ArchitectureSites(
            "Llama",
            "sequential",
            missing=MappingProxyType({"pos_embed": _ROTARY.format(name="Llama")}),
            edit_caveats=MappingProxyType({"resid_mid": _MLP_INPUT_ONLY.format(name="Llama")}),
        ),
        # Post-LayerNorm. Measured on the bridge (mechedit.checks.check_hooks verifies it):
        # hook_attn_out = LN1(resid_pre + attention output), hook_resid_mid = hook_attn_out +
        # mlp_out (before LN2), resid_post = LN2(hook_resid_mid), hook_embed = resid_pre of
        # block 0; hook_pattern is read back after the HF module used it (no effect, no grad).
        "BertForMaskedLM": ArchitectureSites(
            "BERT",
            "post_ln",
            missing=MappingProxyType(
                {
                    "embed": (
                        "BERT's bridge places hook_embed after the embedding LayerNorm (token + "
                        "position + token-type embeddings, normalised): it is block 0's "
                        "resid_pre, not the token embeddings (those are at hook 'embed.hook_out')"
                    ),
                    "attn_out": (
                        "BERT is post-LayerNorm: its bridge's hook_attn_out is LN1(resid_pre + "
                        "attention output), the normalised residual, not what attention adds "
                        "(that is at hook 'blocks.L.attn.o.hook_out'); use head or resid_pre"
                    ),
                    "resid_mid": (
                        "BERT is post-LayerNorm: its bridge's hook_resid_mid is the sum *after* "
                        "the MLP (LN1 output + mlp_out, before LN2), not a residual between "
                        "attention and MLP; use resid_pre / resid_post"
                    ),
                    "pattern": (
                        "BERT's bridge reads the attention pattern back from the HF module's "
                        "outputs after they were used, so hook_pattern only observes it: edits "
                        "do nothing and it has no gradient"
                    ),
                }
            ),
            edit_caveats=MappingProxyType(
                {
                    "attn": (
                        "activation edits of the whole attention block act on hook_attn_out, "
                        "which on BERT is the normalised residual LN1(resid_pre + attention "
                        "output), not the block's output; weight edits of the block are fine"
                    ),
                }
            ),
        ),
    }
)


def architecture_sites(model: Any) -> ArchitectureSites | None:
    """The ``ARCHITECTURES`` row of a bridge's HF model class, or ``None`` if not in the table."""
    original = getattr(model, "original_model", None)
    return None if original is None else ARCHITECTURES.get(type(original).__name__)


def missing_sites(model: Any) -> dict[str, str]:
    """Site -> why ``model`` does not compute it.

    From ``ARCHITECTURES`` for known architectures; for others, the sites whose hooks are not in
    ``model.hook_dict`` (a hook listed there may still never fire: add the architecture to the
    table after checking with ``mechedit.checks.check_hooks``).
    """
    arch = architecture_sites(model)
    if arch is not None:
        return arch.missing_sites(model.original_model.config)
    hooks = model.hook_dict
    return {
        site: f"this model's bridge has no hook {hook_name(site, 0)!r}"
        for site, spec in SITES.items()
        if spec.hook is not None and hook_name(site, 0) not in hooks
    }


def edit_caveats(model: Any) -> dict[str, str]:
    """Site -> why an edit or gradient at its hook does not act on all the name suggests."""
    arch = architecture_sites(model)
    return {} if arch is None else dict(arch.edit_caveats)


def available_sites(model: Any) -> tuple[str, ...]:
    """The sites of ``SITES`` that ``model`` computes (weight ``partition`` included), in table order."""
    missing = missing_sites(model)
    return tuple(site for site in SITES if site not in missing)


def require_site(model: Any, site: str) -> str:
    """Return ``site`` if ``model`` computes it; else a ``ValueError`` saying why not."""
    site_spec(site)
    missing = missing_sites(model)
    if site in missing:
        raise ValueError(
            f"site {site!r} does not exist on this model: {missing[site]}. "
            f"Sites it has: {', '.join(s for s in SITES if s not in missing)}"
        )
    return site


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
    "hook_embed": "embed",
    "hook_pos_embed": "pos_embed",
    "hook_q": "q",
    "hook_k": "k",
    "hook_v": "v",
    "hook_pattern": "pattern",
    "attn_pattern": "pattern",
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
        elif spec.hook is not None and not spec.per_layer and self.layer != 0:
            raise ValueError(_before_blocks(self.site, self.layer))
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


def _before_blocks(site: str, layer: Any) -> str:
    return (
        f"site {site!r} is computed once, before the blocks, so its layer is always 0 "
        f"(it enters block 0), got {layer!r}"
    )


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
    if not spec.per_layer and layer != 0:
        raise ValueError(_before_blocks(site, layer))
    return spec.hook.format(layer=layer)


def _site_of_hook(name: str) -> str | None:
    """The activation site whose hook template matches ``name`` (``None`` if none does)."""
    for site, spec in SITES.items():
        if spec.hook is None or spec.kind != "activation":
            continue
        prefix, _, suffix = spec.hook.partition("{layer}")
        if not spec.per_layer:
            if name == spec.hook:
                return site
        elif name.startswith(prefix) and name.endswith(suffix):
            middle = name[len(prefix) : len(name) - len(suffix)]
            if middle.isdigit():
                return site
    return None


def hook_site_problem(model: Any, name: str) -> str | None:
    """Why ``model`` does not compute the site hook ``name`` (from ``ARCHITECTURES``), or ``None``."""
    site = _site_of_hook(name) if isinstance(name, str) else None
    return None if site is None else missing_sites(model).get(site)


def check_hook_name(model: Any, name: str) -> str:
    """Return ``name`` if it is in ``model.hook_dict``; else a ``ValueError`` saying why not.

    For the hook of a site the architecture does not compute (``hook_resid_mid`` on GPT-NeoX)
    the message gives the reason from ``ARCHITECTURES``; otherwise the nearest names. Raw hook
    names pass as the bridge has them: a site-level check (``require_site``, ``validate``) also
    refuses hooks that exist but do not mean what their site says (BERT's ``hook_attn_out``).
    """
    hooks = model.hook_dict
    if name in hooks:
        return name
    reason = hook_site_problem(model, name)
    if reason:
        raise ValueError(f"hook {name!r} is not in this model: {reason}")
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

    ``head`` / ``q`` / ``pattern`` -> ``cfg.n_heads``; ``k`` / ``v`` -> ``cfg.n_key_value_heads``
    (``n_heads`` without grouped keys and values); ``neuron`` / ``neuron_pre`` -> ``cfg.d_mlp``.
    Partitions vary by parameter: use ``partition_size``.
    """
    spec = site_spec(site)
    if spec.size is None:
        return None
    value = getattr(model.cfg, spec.size, None)
    if value is None and spec.size == "n_key_value_heads":
        value = model.cfg.n_heads
    return int(value)


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
    require_site(model, component.site)
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

    ``embed`` / ``pos_embed`` have only layer 0 (empty if ``layers`` leaves 0 out).

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
    if not spec.per_layer:
        chosen = [layer for layer in chosen if layer == 0]
    if spec.index is None:
        return [Component(site, layer) for layer in chosen]
    size = index_size(model, site)
    return [Component(site, layer, **{spec.index: i}) for layer in chosen for i in range(size)]


__all__ = [
    "ARCHITECTURES",
    "HEAD_DIMS",
    "MLP_DIMS",
    "PATTERN_DIMS",
    "RESID_DIMS",
    "SITES",
    "ArchitectureSites",
    "Component",
    "SiteSpec",
    "all_components",
    "architecture_sites",
    "available_sites",
    "check_hook_name",
    "check_layer",
    "hook_name",
    "index_size",
    "edit_caveats",
    "hook_site_problem",
    "missing_sites",
    "parameter_names",
    "parse_partition_key",
    "partition_key",
    "partition_size",
    "partition_sizes",
    "require_site",
    "site_axes",
    "site_spec",
    "validate",
    "validate_all",
]
