"""The one place that knows how a TransformerBridge's parameters map to Hugging Face names.

Two kinds of knowledge live here:

* **Names.** The bridge wraps every HF module, so the HF model's own parameter names gain
  ``._original_component`` segments (``transformer.h.0._original_component.mlp._original_component
  .c_fc._original_component.weight``), and the bridge adds aliases for the same tensors under its
  own names (``attn.q/k/v`` views into ``c_attn``, ``attn.qkv`` = ``c_attn``, ``attn.o`` =
  ``attn.c_proj``, ``mlp.in/out`` = ``c_fc/c_proj``, ``h.0.ln1`` = ``h.0.ln_1`` ...). Removing the
  wrapper segments from the wrapped model's state-dict keys and keeping the names a freshly built HF
  model of the same class has recovers the plain HF state dict; every other key is an alias. The
  result is checked, not assumed: every HF key must be found and aliases of one key must be one
  tensor. Tied parameters (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) are listed
  once, under their first name in HF state-dict order, wherever parameters are enumerated
  (``hf_parameters``); ``hf_state_dict`` keeps every name for export. A bridge parameter sharing no
  storage with any HF tensor is a private copy the bridge computes with (TransformerLens's split
  q/k/v of GPT-NeoX's interleaved ``query_key_value``): the HF tensors of its module are then
  "shadowed", and ``hf_parameters`` leaves them out, because editing them would not change the
  bridge's outputs. ``mechedit.load`` removes such copies (``bind_fused_qkv``), so a loaded model
  has none. (TransformerLens's ``bridge._normalize_bridge_key_to_hf`` only renames block attributes
  such as ``ln1 -> ln_1``; it keeps ``_original_component`` and the q/k/v/in/out aliases, so it is
  not used.)

* **Layouts.** Which entries of which HF tensors belong to an attention head, an MLP neuron, a
  whole block or one output unit, per architecture, as data in ``LAYOUTS`` (GPT-2, GPT-NeoX, Llama,
  BERT); ``NEURON_LAYOUTS``, ``mechedit.components.partition_sizes`` and ``circuit_parameters``
  all read it. GPT-2's ``Conv1D`` stores weights as ``[in, out]``; ``nn.Linear`` (GPT-NeoX, Llama,
  BERT) stores ``[out, in]``; so an output unit is a column in one and a row in the other. To
  support a new architecture, add one entry.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedModel

if TYPE_CHECKING:
    from mechedit.components import Component

WRAPPER_SEGMENT = "_original_component"


def hf_model(bridge: Any) -> torch.nn.Module:
    """The wrapped HF model inside a bridge (``bridge.original_model``); its class names the architecture."""
    model = getattr(bridge, "original_model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"expected a TransformerBridge (load one with mechedit.load(...)), got {type(bridge).__name__}"
        )
    return model


def architecture(bridge: Any) -> str:
    """The HF architecture name of a bridge's model, e.g. ``"GPT2LMHeadModel"`` (its class name)."""
    return type(hf_model(bridge)).__name__


def hf_config(bridge: Any) -> Any:
    """A copy of the bridge's HF config, as a plain checkpoint should carry it.

    The bridge loads the config with ``output_attentions=True`` so its hooks can read attention
    patterns from the forward's outputs; a plain checkpoint should not force that on its users.
    """
    config = copy.deepcopy(hf_model(bridge).config)
    config.output_attentions = False
    return config


def _strip_wrappers(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != WRAPPER_SEGMENT)


@dataclass(frozen=True)
class _Mapping:
    tensors: dict[str, Tensor]  # HF name -> live parameter or persistent buffer, HF key order
    shadowed: frozenset[str]  # HF names the bridge's forward may not read (it keeps own copies)


def _map(bridge: Any) -> _Mapping:
    model = hf_model(bridge)
    # The meta device builds the module tree (names, shapes, ties) without allocating weights.
    with torch.device("meta"):
        reference = type(model)(copy.deepcopy(model.config))
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    hf_modules = {name for name, _ in reference.named_modules()}

    found: dict[str, Tensor] = {}
    for wrapped_name, tensor in model.state_dict(keep_vars=True).items():
        name = _strip_wrappers(wrapped_name)
        if name not in expected:
            continue  # a bridge alias (attn.q, mlp.in, h.0.ln1, ...) or a bridge-only buffer
        previous = found.setdefault(name, tensor)
        if previous is not tensor:
            raise RuntimeError(
                f"HF name {name!r} is reached by two different tensors in the bridge "
                f"(second one: {wrapped_name!r}); the bridge's wrapping changed: update "
                "mechedit/hf.py's name mapping for this TransformerLens version."
            )
    missing = [name for name in expected if name not in found]
    if missing:
        raise RuntimeError(
            f"no bridge tensor for HF parameters {missing} of {type(model).__name__}; "
            "update mechedit/hf.py's name mapping for this TransformerLens version."
        )
    wrong = {
        n: (tuple(found[n].shape), s) for n, s in expected.items() if tuple(found[n].shape) != s
    }
    if wrong:
        raise RuntimeError(
            f"bridge tensors differ in shape from a fresh HF model (bridge, HF): {wrong}"
        )

    # A bridge parameter sharing no storage with any HF tensor is a copy the bridge computes with
    # (GPT-NeoX's split q/k/v): editing the HF tensor it came from would not change the bridge.
    # Which HF tensor it copies is not recorded, so every HF tensor of the deepest HF module
    # holding the copy counts as shadowed: conservative, never silently a no-op.
    mapped_storages = {t.untyped_storage().data_ptr() for t in found.values()}
    owner: dict[int, str] = {}
    for wrapped_name, param in model.named_parameters(remove_duplicate=False):
        if param.untyped_storage().data_ptr() in mapped_storages:
            continue
        parts = _strip_wrappers(wrapped_name).split(".")
        prefix = next(
            ".".join(parts[:k])
            for k in range(len(parts) - 1, -1, -1)
            if ".".join(parts[:k]) in hf_modules
        )
        if len(prefix) >= len(owner.get(id(param), "")):
            owner[id(param)] = prefix
    shadowed = frozenset(
        name
        for name in expected
        for prefix in owner.values()
        if prefix == "" or name.startswith(prefix + ".")
    )
    return _Mapping({name: found[name] for name in expected}, shadowed)


def hf_parameters(bridge: Any, *, tied_aliases: bool = False) -> dict[str, torch.nn.Parameter]:
    """HF parameter name -> the bridge's live ``nn.Parameter``, each parameter once, in HF order.

    Tied parameters are one tensor under several HF names (GPT-2's ``transformer.wte.weight`` and
    ``lm_head.weight``; BERT's ``bert.embeddings.word_embeddings.weight`` and
    ``cls.predictions.decoder.weight``). They are listed once, under their **canonical name: the
    first of their names in HF state-dict order** (``transformer.wte.weight``), so scores, masks,
    gradients and optimizers never count them twice; ``hf_tied_names`` maps the other names to it.
    ``tied_aliases=True`` also lists the other names (same objects), for code that resolves names
    a user typed (edits, exports).

    Editing one in place (``p.copy_(...)`` under ``no_grad``) edits what the bridge computes with:
    its views (``attn.q`` etc.) share the storage. Left out: buffers, and parameters the bridge
    shadows with its own copies (a bridge booted without ``mechedit.load`` on GPT-NeoX), whose
    edits it would not see.
    """
    return _parameters(_map(bridge), tied_aliases=tied_aliases)


def _parameters(mapping: _Mapping, *, tied_aliases: bool) -> dict[str, torch.nn.Parameter]:
    params: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for name, tensor in mapping.tensors.items():
        if not isinstance(tensor, torch.nn.Parameter) or name in mapping.shadowed:
            continue
        if id(tensor) in seen and not tied_aliases:
            continue
        seen.add(id(tensor))
        params[name] = tensor
    return params


def hf_tied_names(model: Any) -> dict[str, str]:
    """Every tied HF parameter name that is not canonical -> its canonical name.

    The canonical name is the first name of the tensor in HF state-dict order, e.g.
    ``{"lm_head.weight": "transformer.wte.weight"}`` for GPT-2 (``{}`` without tied weights).
    ``model`` is a bridge or a plain HF model.
    """
    if _is_hf_model(model):
        return _tied_names(model.named_parameters(remove_duplicate=False))
    return _tied_names(_map(model).tensors.items())


def _tied_names(named: Iterable[tuple[str, Tensor]]) -> dict[str, str]:
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in named:
        if not isinstance(tensor, torch.nn.Parameter):
            continue
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def hf_parameter(bridge: Any, hf_name: str) -> torch.nn.Parameter:
    """The live parameter behind plain HF name ``hf_name`` (e.g. ``"transformer.h.0.mlp.c_fc.weight"``).

    Tied names all give the one parameter (``"lm_head.weight"`` is ``"transformer.wte.weight"``).
    """
    params = hf_parameters(bridge, tied_aliases=True)
    if hf_name not in params and hf_name in _map(bridge).shadowed:
        raise KeyError(
            f"{hf_name!r} cannot be edited through this bridge: the bridge computes with its own "
            "copies of this module's weights, so an in-place edit would not change its outputs. "
            "Load the model with mechedit.load, which makes the bridge compute with these tensors."
        )
    if hf_name not in params:
        raise KeyError(
            f"{hf_name!r} is not a parameter of this {architecture(bridge)}; "
            f"valid names include {list(params)[:6]} ... (see hf_state_dict(bridge).keys())"
        )
    return params[hf_name]


def hf_state_dict(bridge: Any) -> dict[str, Tensor]:
    """The bridge's weights under plain HF names, exactly the keys of a fresh HF model's state dict.

    Aliases and views are deduplicated; tied weights keep both names (GPT-2's ``lm_head.weight``
    is ``transformer.wte.weight``). Tensors are detached but share storage with the live model, so
    they change when the model is edited: clone them to keep a snapshot.
    """
    return {name: t.detach() for name, t in _map(bridge).tensors.items()}


# --- architecture tables -------------------------------------------------------------------------


def _check_template(template: str, what: str) -> None:
    if "{layer}" not in template:
        raise ValueError(f"{what} must contain '{{layer}}': {template!r}")


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{layer}"), r"\d+"))


@dataclass(frozen=True)
class NeuronSlice:
    """One HF tensor per layer whose index ``j`` along ``dim`` belongs to MLP neuron ``j``.

    ``template`` is the HF parameter name with ``{layer}`` for the layer number. For a weight
    stored ``[in, out]`` (GPT-2 ``Conv1D``) a neuron's input is column ``j`` (``dim=1``) and its
    output row ``j`` (``dim=0``); for ``nn.Linear``'s ``[out, in]`` it is the other way round.
    """

    template: str
    dim: int

    def __post_init__(self) -> None:
        _check_template(self.template, "template")
        if self.dim not in (0, 1):
            raise ValueError(
                f"dim must be 0 or 1 (weights are matrices, biases vectors), got {self.dim}"
            )

    def name(self, layer: int) -> str:
        return self.template.format(layer=layer)

    def zeroed(self, tensor: Tensor, neurons: Int[Tensor, " k"]) -> Tensor:
        """A copy of ``tensor`` with index ``neurons`` along ``dim`` set to zero (all at once)."""
        if tensor.dim() <= self.dim:
            raise ValueError(f"{self.template}: a {tensor.dim()}-d tensor has no dim {self.dim}")
        return tensor.detach().index_fill(self.dim, neurons.to(tensor.device), 0)


@dataclass(frozen=True)
class NeuronLayout:
    """Where MLP neuron ``(layer, j)`` lives: the slices feeding it and the slices it writes.

    Zeroing all ``inputs`` slices makes its pre-activation 0 (so ``act(0) = 0`` for GELU/SiLU,
    and the gated product is 0); zeroing all ``outputs`` slices removes what it adds to the
    residual stream. Output biases are shared by all neurons and are never touched. A bias slice
    may name a bias that a checkpoint of the architecture lacks (Llama without ``mlp_bias``):
    skip names the model does not have (``circuit_parameters`` does).
    """

    inputs: tuple[NeuronSlice, ...]
    outputs: tuple[NeuronSlice, ...]

    def __post_init__(self) -> None:
        if not self.inputs or not self.outputs:
            raise ValueError("a neuron layout needs at least one input and one output slice")

    @property
    def slices(self) -> tuple[NeuronSlice, ...]:
        return self.inputs + self.outputs


@dataclass(frozen=True)
class Linear:
    """One linear map of a block, as HF parameter names with ``{layer}``.

    ``in_out`` says how the weight is stored: ``True`` for ``[in, out]`` (GPT-2's ``Conv1D``),
    ``False`` for ``nn.Linear``'s ``[out, in]``. Its **output units** (the partition units, see
    ``output_axis``) lie along ``out_axis`` of the weight and along the bias. ``bias`` may name a
    bias that some checkpoints of the architecture lack (Llama's ``attention_bias``); such a name
    is skipped where the model does not have it.
    """

    weight: str
    bias: str | None = None
    in_out: bool = False

    def __post_init__(self) -> None:
        _check_template(self.weight, "weight")
        if self.bias is not None:
            _check_template(self.bias, "bias")

    @property
    def out_axis(self) -> int:
        return 1 if self.in_out else 0

    @property
    def in_axis(self) -> int:
        return 0 if self.in_out else 1

    @property
    def names(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


# How a fused q/k/v projection orders its output units (d = d_head, H = n_heads):
#   "qkv_head": [Q_0 .. Q_{H-1} | K_0 .. K_{H-1} | V_0 .. V_{H-1}], each block d wide (GPT-2 c_attn);
#   "head_qkv": [Q_0 K_0 V_0 | Q_1 K_1 V_1 | ...], interleaved per head (GPT-NeoX query_key_value:
#               HF views its output as [..., H, 3 * d] and chunks the last axis into q, k, v).
FUSED_ORDERS = ("qkv_head", "head_qkv")


@dataclass(frozen=True)
class AttentionLayout:
    """Where attention head ``(layer, h)`` lives.

    ``qkv`` is either one fused projection (``fused`` names its order, see ``FUSED_ORDERS``) or
    three separate ones ``(q, k, v)`` with ``fused=None``. A head's q/k/v outputs are ``d_head``
    consecutive output units (rows of ``nn.Linear``, columns of ``Conv1D``); with grouped-query
    attention (``num_key_value_heads < num_attention_heads``) query head ``h`` reads key/value head
    ``h // (n_heads // n_kv_heads)``, whose units it shares with the other heads of its group. ``o``
    reads the heads' mixed values ``z`` concatenated, so head ``h`` owns its input units
    ``h*d_head .. (h+1)*d_head - 1``; its bias is shared by all heads.
    """

    qkv: tuple[Linear, ...]
    o: Linear
    fused: str | None = None

    def __post_init__(self) -> None:
        if self.fused is None and len(self.qkv) != 3:
            raise ValueError("separate projections need qkv=(q, k, v)")
        if self.fused is not None and (len(self.qkv) != 1 or self.fused not in FUSED_ORDERS):
            raise ValueError(
                f"a fused projection is qkv=(one Linear,) with fused in {FUSED_ORDERS}"
            )


@dataclass(frozen=True)
class ArchitectureLayout:
    """Where one architecture keeps its blocks' parameters; one entry of ``LAYOUTS``.

    ``mlp_in``: the linears whose output units are the MLP neurons (GPT-2 ``c_fc``; Llama's gate
    and up projections); ``mlp_out``: the linear that reads the neurons. A whole ``mlp`` / ``attn``
    block is every weight and bias of its linears; ``mlp_norms`` / ``attn_norms`` name the block's
    own LayerNorm/RMSNorm (the pre-norm that feeds it, or for post-LN BERT the norm its output
    passes through), which ``circuit_parameters`` adds only with ``norms=True``.
    """

    attn: AttentionLayout
    mlp_in: tuple[Linear, ...]
    mlp_out: Linear
    attn_norms: tuple[str, ...] = ()
    mlp_norms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.attn_norms + self.mlp_norms:
            _check_template(name, "norm")
        in_out = [t.weight for t in self.linears if t.in_out]
        object.__setattr__(self, "_in_out", tuple(_template_regex(t) for t in in_out))

    @property
    def linears(self) -> tuple[Linear, ...]:
        return (*self.attn.qkv, self.attn.o, *self.mlp_in, self.mlp_out)

    @property
    def neuron_layout(self) -> NeuronLayout:
        """The ``NeuronLayout`` these linears imply (inputs: output units; outputs: input units)."""
        inputs = tuple(
            piece
            for lin in self.mlp_in
            for piece in (
                NeuronSlice(lin.weight, lin.out_axis),
                *(() if lin.bias is None else (NeuronSlice(lin.bias, 0),)),
            )
        )
        return NeuronLayout(inputs, (NeuronSlice(self.mlp_out.weight, self.mlp_out.in_axis),))

    def output_axis(self, name: str, ndim: int) -> int:
        """The axis of parameter ``name`` (``ndim`` dimensions) that indexes its output units.

        Axis 1 for a weight stored ``[in, out]`` in this table, else axis 0: rows of ``nn.Linear``
        weights ``[out, in]``, of embedding tables (one row per token or position), and the
        elements of biases and norm vectors.
        """
        if ndim >= 2 and any(p.fullmatch(name) for p in self._in_out):  # type: ignore[attr-defined]
            return 1
        return 0


def _linear(prefix: str, *, bias: bool = True, in_out: bool = False) -> Linear:
    return Linear(f"{prefix}.weight", f"{prefix}.bias" if bias else None, in_out)


_GPT2 = "transformer.h.{layer}"
_NEOX = "gpt_neox.layers.{layer}"
_LLAMA = "model.layers.{layer}"
_BERT = "bert.encoder.layer.{layer}"

# Keyed by HF architecture (the model class name, as in config.json's "architectures"). To support
# a new architecture, add one entry here; neuron layouts, partitions and head masks follow.
LAYOUTS: Mapping[str, ArchitectureLayout] = MappingProxyType(
    {
        # Conv1D weights are [in, out]: c_attn [d_model, 3*d_model], c_fc [d_model, d_mlp] ...
        "GPT2LMHeadModel": ArchitectureLayout(
            attn=AttentionLayout(
                qkv=(_linear(f"{_GPT2}.attn.c_attn", in_out=True),),
                o=_linear(f"{_GPT2}.attn.c_proj", in_out=True),
                fused="qkv_head",
            ),
            mlp_in=(_linear(f"{_GPT2}.mlp.c_fc", in_out=True),),
            mlp_out=_linear(f"{_GPT2}.mlp.c_proj", in_out=True),
            attn_norms=(f"{_GPT2}.ln_1.weight", f"{_GPT2}.ln_1.bias"),
            mlp_norms=(f"{_GPT2}.ln_2.weight", f"{_GPT2}.ln_2.bias"),
        ),
        # nn.Linear [out, in]; query_key_value [3*d_model, d_model] interleaved per head.
        "GPTNeoXForCausalLM": ArchitectureLayout(
            attn=AttentionLayout(
                qkv=(_linear(f"{_NEOX}.attention.query_key_value"),),
                o=_linear(f"{_NEOX}.attention.dense"),
                fused="head_qkv",
            ),
            mlp_in=(_linear(f"{_NEOX}.mlp.dense_h_to_4h"),),
            mlp_out=_linear(f"{_NEOX}.mlp.dense_4h_to_h"),
            attn_norms=(f"{_NEOX}.input_layernorm.weight", f"{_NEOX}.input_layernorm.bias"),
            mlp_norms=(
                f"{_NEOX}.post_attention_layernorm.weight",
                f"{_NEOX}.post_attention_layernorm.bias",
            ),
        ),
        # Separate q/k/v (k/v have num_key_value_heads heads); gated MLP: neuron j is
        # act(gate_j) * up_j, read by down's column j. Biases only with attention_bias / mlp_bias.
        "LlamaForCausalLM": ArchitectureLayout(
            attn=AttentionLayout(
                qkv=tuple(_linear(f"{_LLAMA}.self_attn.{p}_proj") for p in "qkv"),
                o=_linear(f"{_LLAMA}.self_attn.o_proj"),
            ),
            mlp_in=(_linear(f"{_LLAMA}.mlp.gate_proj"), _linear(f"{_LLAMA}.mlp.up_proj")),
            mlp_out=_linear(f"{_LLAMA}.mlp.down_proj"),
            attn_norms=(f"{_LLAMA}.input_layernorm.weight",),
            mlp_norms=(f"{_LLAMA}.post_attention_layernorm.weight",),
        ),
        # Post-LN encoder: each sublayer's output passes through its own LayerNorm.
        "BertForMaskedLM": ArchitectureLayout(
            attn=AttentionLayout(
                qkv=tuple(
                    _linear(f"{_BERT}.attention.self.{p}") for p in ("query", "key", "value")
                ),
                o=_linear(f"{_BERT}.attention.output.dense"),
            ),
            mlp_in=(_linear(f"{_BERT}.intermediate.dense"),),
            mlp_out=_linear(f"{_BERT}.output.dense"),
            attn_norms=(
                f"{_BERT}.attention.output.LayerNorm.weight",
                f"{_BERT}.attention.output.LayerNorm.bias",
            ),
            mlp_norms=(f"{_BERT}.output.LayerNorm.weight", f"{_BERT}.output.LayerNorm.bias"),
        ),
    }
)

# Derived from LAYOUTS, so neuron edits, partitions and circuit masks share one table.
NEURON_LAYOUTS: Mapping[str, NeuronLayout] = MappingProxyType(
    {arch: layout.neuron_layout for arch, layout in LAYOUTS.items()}
)


def _architecture_name(model_or_architecture: Any) -> str:
    if isinstance(model_or_architecture, str):
        return model_or_architecture
    if _is_hf_model(model_or_architecture):
        return type(model_or_architecture).__name__
    return architecture(model_or_architecture)


def layout(model_or_architecture: Any) -> ArchitectureLayout:
    """The ``ArchitectureLayout`` of a bridge, a plain HF model or an architecture name."""
    arch = _architecture_name(model_or_architecture)
    if arch not in LAYOUTS:
        raise KeyError(
            f"no parameter layout for architecture {arch!r}; known: {sorted(LAYOUTS)}. "
            "Add an entry to mechedit.hf.LAYOUTS naming its attention and MLP linears."
        )
    return LAYOUTS[arch]


def neuron_layout(bridge_or_architecture: Any) -> NeuronLayout:
    """The ``NeuronLayout`` of a bridge (or of an architecture name such as ``"GPT2LMHeadModel"``)."""
    arch = _architecture_name(bridge_or_architecture)
    if arch not in NEURON_LAYOUTS:
        raise KeyError(
            f"no MLP neuron layout for architecture {arch!r}; known: {sorted(NEURON_LAYOUTS)}. "
            "Add an entry to mechedit.hf.LAYOUTS (NEURON_LAYOUTS is derived from it) naming the "
            "tensors and the axis that holds the neuron index."
        )
    return NEURON_LAYOUTS[arch]


def _is_hf_model(model: Any) -> bool:
    return isinstance(model, PreTrainedModel)


# --- parameters of a circuit ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int


def _dims(hf: Any) -> _Dims:
    config = hf.config
    n_heads = int(config.num_attention_heads)
    d_head = getattr(config, "head_dim", None) or int(config.hidden_size) // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return _Dims(int(config.num_hidden_layers), n_heads, int(n_kv), int(d_head))


def _parameter_view(
    model: Any,
) -> tuple[dict[str, torch.nn.Parameter], dict[str, str], frozenset[str]]:
    """Canonical parameters (HF order), tied aliases -> canonical name, and shadowed names."""
    if _is_hf_model(model):
        params = dict(model.named_parameters())  # tied weights once, under the first name
        return params, _tied_names(model.named_parameters(remove_duplicate=False)), frozenset()
    mapping = _map(model)
    params = _parameters(mapping, tied_aliases=False)
    return params, _tied_names(mapping.tensors.items()), mapping.shadowed


def _span(starts: Tensor, width: int) -> Tensor:
    """``[s, s+1, .., s+width-1]`` for every start, concatenated (long, ``[len(starts)*width]``)."""
    return (starts[:, None] + torch.arange(width)).reshape(-1)


def _qkv_units(attn: AttentionLayout, dims: _Dims, heads: Tensor) -> list[tuple[Linear, Tensor]]:
    """Each q/k/v projection with the output units that feed query heads ``heads``."""
    d, n_heads = dims.d_head, dims.n_heads
    if attn.fused is None:
        kv_heads = heads // (n_heads // dims.n_kv_heads)
        q, k, v = attn.qkv
        return [(q, _span(heads * d, d)), (k, _span(kv_heads * d, d)), (v, _span(kv_heads * d, d))]
    if dims.n_kv_heads != n_heads:
        raise ValueError("a fused q/k/v projection with grouped key/value heads is not in LAYOUTS")
    part = torch.arange(3)[:, None]  # q, k, v
    if attn.fused == "qkv_head":
        starts = part * n_heads * d + heads[None, :] * d
    else:  # "head_qkv"
        starts = heads[None, :] * 3 * d + part * d
    return [(attn.qkv[0], _span(starts.reshape(-1), d))]


def circuit_parameters(
    model: Any, circuit: Iterable[Component] | Component, *, norms: bool = False
) -> dict[str, Tensor]:
    """The parameters a circuit covers: plain HF name -> boolean mask of the parameter's shape.

    ``model`` is a bridge (``mechedit.load``) or a plain HF model of an architecture in
    ``LAYOUTS``; ``circuit`` a ``Circuit`` or any iterable of ``Component``. ``True`` marks the
    entries the circuit covers; masks of one parameter from several components are OR-ed. Keys are
    in HF state-dict order and only parameters with at least one ``True`` appear; each mask lives on
    its parameter's device. Tied parameters appear once, under their canonical name (the first in
    HF state-dict order: ``transformer.wte.weight``, also for a partition naming ``lm_head.weight``).

    Per site:

    * ``head`` ``(l, h)``: head ``h``'s ``d_head`` output units of the q, k and v weights and biases
      (in a fused projection: GPT-2 ``c_attn``'s q/k/v blocks, GPT-NeoX ``query_key_value``'s
      per-head interleave) and its ``d_head`` input units of the output projection (``o`` bias is
      shared and left out). Zeroing these entries equals zeroing ``blocks.l.attn.hook_z[:, :, h]``.
      With grouped-query attention the k/v units are those of ``h``'s key/value head, which the
      other query heads of its group also read.
    * ``neuron`` / ``neuron_pre`` ``(l, j)``: the slices ``NEURON_LAYOUTS`` lists: neuron ``j``'s
      output unit of every MLP input linear (weight and bias) and its input unit of the MLP output
      weight. Zeroing them equals zeroing ``blocks.l.mlp.hook_post[..., j]``.
    * ``attn`` / ``mlp`` ``(l)``: every weight and bias of the block's linears, all entries. Norms
      are not part of a block unless ``norms=True``, which adds the block's own norm (the pre-norm
      feeding it; for post-LN BERT the norm its output passes through): a norm also scales what
      the residual stream carries, so it is opt-in.
    * ``partition`` ``(param, unit)``: output unit ``unit`` of ``param`` (see
      ``ArchitectureLayout.output_axis``: a column of a ``Conv1D`` weight, a row of an
      ``nn.Linear`` weight or embedding, one element of a vector).

    Raises ``ValueError`` for a component out of range for the model, one pinned to a position
    (a weight acts at every position: unpin it with ``component.at(None)``), or a site with no
    parameters of its own (residual and hook-output sites; use ``attn`` / ``mlp`` for blocks).
    """
    from mechedit.components import Component  # late: components imports this module

    hf = model if _is_hf_model(model) else hf_model(model)
    arch = layout(model)
    dims = _dims(hf)
    params, aliases, shadowed = _parameter_view(model)
    components = [circuit] if isinstance(circuit, Component) else list(circuit)

    for linear in arch.linears:
        if linear.weight.format(layer=0) not in params.keys() | shadowed:
            raise RuntimeError(
                f"LAYOUTS[{type(hf).__name__!r}] names {linear.weight!r}, which this model lacks; "
                "fix that entry in mechedit/hf.py"
            )

    masks: dict[str, Tensor] = {}

    def cover(template: str, layer: int | None, axis: int | None, index: Tensor | None) -> None:
        """OR into the mask of ``template`` (at ``layer``): ``index`` along ``axis``, or all."""
        name = template if layer is None else template.format(layer=layer)
        name = aliases.get(name, name)
        if name not in params:
            if name in shadowed:
                raise KeyError(
                    f"{name!r} is shadowed by the bridge's own copies of it; load the model with "
                    "mechedit.load, which makes the bridge compute with the HF tensors"
                )
            return  # an optional bias this checkpoint does not have
        param = params[name]
        mask = masks.get(name)
        if mask is None:
            mask = masks[name] = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        if axis is None or index is None:
            mask.fill_(True)
            return
        axis = 0 if param.ndim == 1 else axis
        if int(index.max()) >= param.shape[axis]:
            raise RuntimeError(
                f"LAYOUTS[{type(hf).__name__!r}] puts unit {int(index.max())} on axis {axis} of "
                f"{name}, which has {param.shape[axis]}; fix that entry in mechedit/hf.py"
            )
        mask.index_fill_(axis, index.to(param.device), True)

    heads: dict[int, list[int]] = {}
    neurons: dict[int, list[int]] = {}
    units: dict[str, list[int]] = {}
    for component in components:
        if not isinstance(component, Component):
            raise ValueError(f"a circuit holds Components, got {type(component).__name__}")
        where = f"{component}"
        if component.pos is not None:
            raise ValueError(
                f"{where} is pinned to a position, but a parameter acts at every position; "
                "unpin it with component.at(None) to take its parameters"
            )
        if component.layer is not None and not 0 <= component.layer < dims.n_layers:
            raise ValueError(
                f"{where}: layer {component.layer} out of range: the model has {dims.n_layers} layers"
            )
        site = component.site
        if site == "head":
            if not component.head < dims.n_heads:
                raise ValueError(f"{where}: the model has {dims.n_heads} heads per layer")
            heads.setdefault(component.layer, []).append(component.head)
        elif site in ("neuron", "neuron_pre"):
            neurons.setdefault(component.layer, []).append(component.neuron)
        elif site in ("attn", "mlp"):
            linears = (
                arch.attn.qkv + (arch.attn.o,) if site == "attn" else (*arch.mlp_in, arch.mlp_out)
            )
            block_norms = arch.attn_norms if site == "attn" else arch.mlp_norms
            for name in (
                *(n for lin in linears for n in lin.names),
                *(block_norms if norms else ()),
            ):
                cover(name, component.layer, None, None)
        elif site == "partition":
            name = aliases.get(component.param, component.param)
            if name not in params:
                near = difflib.get_close_matches(component.param, list(params), n=3, cutoff=0.6)
                raise ValueError(
                    f"{where}: {component.param!r} is not a parameter of this model"
                    + (f"; closest: {', '.join(near)}" if near else "")
                )
            param = params[name]
            size = param.shape[arch.output_axis(name, param.ndim)] if param.ndim else 1
            if not component.unit < size:
                raise ValueError(f"{where}: {name} has {size} output units (0..{size - 1})")
            units.setdefault(name, []).append(component.unit)
        else:
            block = {"mlp_out": "mlp", "attn_out": "attn"}.get(site)
            hint = f"; for the block that writes it use Component({block!r}, {component.layer})" if block else ""
            raise ValueError(
                f"{where}: site {site!r} has no parameters of its own; the sites with parameters "
                "are head, neuron, neuron_pre, attn, mlp and partition (attn / mlp for a whole "
                f"block's output){hint}"
            )

    for layer, chosen in heads.items():
        index = torch.tensor(sorted(set(chosen)))
        for linear, rows in _qkv_units(arch.attn, dims, index):
            for name in linear.names:
                cover(name, layer, linear.out_axis, rows)
        o_units = _span(index * dims.d_head, dims.d_head)
        cover(arch.attn.o.weight, layer, arch.attn.o.in_axis, o_units)
    for layer, chosen in neurons.items():
        index = torch.tensor(sorted(set(chosen)))
        d_mlp = params[arch.mlp_out.weight.format(layer=layer)].shape[arch.mlp_out.in_axis]
        if int(index.max()) >= d_mlp:
            raise ValueError(
                f"neuron {int(index.max())} out of range at layer {layer}: the MLP has {d_mlp} "
                f"neurons (0..{d_mlp - 1})"
            )
        for piece in arch.neuron_layout.slices:
            cover(piece.template, layer, piece.dim, index)
    for name, chosen in units.items():
        param = params[name]
        cover(
            name,
            None,
            arch.output_axis(name, param.ndim) if param.ndim else None,
            torch.tensor(sorted(set(chosen))),
        )
    return {name: masks[name] for name in params if name in masks}


# --- making the bridge compute with the HF tensors -----------------------------------------------


class _FusedPart(torch.nn.Linear):
    """q, k or v of a fused HF projection, read from the fused parameter at every use.

    An ``nn.Linear`` (weight ``[out, in]``) whose ``weight`` and ``bias`` are the ``units`` of the
    fused module's output, gathered on each access. It owns no parameters: gradients, optimizer
    steps and in-place edits all reach the fused HF tensor, the one ``export_hf`` writes.
    """

    def __init__(self, fused: torch.nn.Module, units: Tensor, *, in_out: bool) -> None:
        torch.nn.Module.__init__(self)
        # A plain attribute, not a submodule: the fused module is owned (and listed) elsewhere.
        object.__setattr__(self, "_fused", fused)
        self.register_buffer("units", units, persistent=False)
        self.in_out = in_out
        self.out_features = int(units.numel())
        self.in_features = int(fused.weight.shape[0 if in_out else 1])

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        fused = self._fused.weight
        if self.in_out:
            return fused.index_select(1, self.units).T
        return fused.index_select(0, self.units)

    @property  # type: ignore[override]
    def bias(self) -> Tensor | None:
        fused = self._fused.bias
        return None if fused is None else fused.index_select(0, self.units)


def _modules_by_parameter(hf: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Plain HF parameter name -> the HF module holding it (wrapper segments removed)."""
    owners: dict[str, torch.nn.Module] = {}
    for name, _ in hf.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        owners.setdefault(_strip_wrappers(name), hf.get_submodule(owner))
    return owners


def bind_fused_qkv(bridge: Any, *, views: bool = False) -> int:
    """Make the bridge's split q/k/v read the fused HF q/k/v tensor; returns the layers rebound.

    TransformerLens splits a fused q/k/v projection into three ``nn.Linear`` it computes with. For
    GPT-2 they are views of ``c_attn`` (same storage), but for GPT-NeoX the per-head interleave
    forces copies: training or editing ``query_key_value`` then never reaches the bridge's outputs,
    and the exported checkpoint silently differs from the model that was trained. This replaces
    every copy (only where it does not share storage with the fused tensor) by a ``_FusedPart``
    gathered from ``LAYOUTS``'s units on each forward, checked equal to the copy it replaces.
    Architectures with separate q/k/v, or none in ``LAYOUTS``, are left as they are.

    ``views=True`` rebinds GPT-2's views too. They already train and edit correctly (one storage),
    but their gradients land on the views' own ``nn.Parameter`` objects, not on ``c_attn.weight``;
    rebinding sends them to ``c_attn.weight``, for code that takes gradients by HF name. It is not
    the default because it removes the views from ``bridge.named_parameters()``, which changes
    ``mechedit.provenance.weights_hash`` of every GPT-2 (and so the recorded provenance of shipped
    circuits).
    """
    arch_name = architecture(bridge)
    if arch_name not in LAYOUTS or LAYOUTS[arch_name].attn.fused is None:
        return 0
    attn_layout = LAYOUTS[arch_name].attn
    fused_linear = attn_layout.qkv[0]
    hf = hf_model(bridge)
    dims = _dims(hf)
    owners = _modules_by_parameter(hf)
    # One row per q/k/v part, each listing the fused output units of heads 0..H-1 in order.
    ((_, units),) = _qkv_units(attn_layout, dims, torch.arange(dims.n_heads))
    parts = units.view(3, dims.n_heads * dims.d_head)
    rebound = 0
    for layer in range(dims.n_layers):
        fused = owners[fused_linear.weight.format(layer=layer)]
        attn = bridge.blocks[layer].attn
        storage = fused.weight.untyped_storage().data_ptr()
        for p, letter in enumerate("qkv"):
            old = getattr(attn, letter).original_component
            if isinstance(old, _FusedPart) or (
                not views and old.weight.untyped_storage().data_ptr() == storage
            ):
                continue  # already reads the fused tensor (GPT-2's views, or bound before)
            new = _FusedPart(fused, parts[p].to(fused.weight.device), in_out=fused_linear.in_out)
            with torch.no_grad():
                same = torch.equal(new.weight, old.weight) and (
                    (new.bias is None) == (old.bias is None)
                    and (new.bias is None or torch.equal(new.bias, old.bias))
                )
            if not same:
                raise RuntimeError(
                    f"the bridge's blocks.{layer}.attn.{letter} does not match LAYOUTS[{arch_name!r}]'s "
                    f"'{attn_layout.fused}' units of {fused_linear.weight.format(layer=layer)}; fix "
                    "the table in mechedit/hf.py"
                )
            getattr(attn, letter).set_original_component(new)
            rebound += letter == "q"
    return rebound


__all__ = [
    "FUSED_ORDERS",
    "LAYOUTS",
    "NEURON_LAYOUTS",
    "WRAPPER_SEGMENT",
    "ArchitectureLayout",
    "AttentionLayout",
    "Linear",
    "NeuronLayout",
    "NeuronSlice",
    "architecture",
    "bind_fused_qkv",
    "circuit_parameters",
    "hf_config",
    "hf_model",
    "hf_parameter",
    "hf_parameters",
    "hf_state_dict",
    "hf_tied_names",
    "layout",
    "neuron_layout",
]
