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
  tensor. A bridge parameter sharing no storage with any HF tensor is a private copy the bridge
  computes with (GPT-NeoX's split q/k/v): the HF tensors of its module are then "shadowed", and
  ``hf_parameters`` leaves them out, because editing them would not change the bridge's outputs.
  (TransformerLens's ``bridge._normalize_bridge_key_to_hf`` only renames block attributes such as
  ``ln1 -> ln_1``; it keeps ``_original_component`` and the q/k/v/in/out aliases, so it is not used.)

* **Neuron layouts.** Which slices of which HF tensors feed and leave MLP neuron ``(layer, j)``,
  per architecture, as data in ``NEURON_LAYOUTS``. GPT-2's ``Conv1D`` stores weights as
  ``[in, out]``; ``nn.Linear`` (GPT-NeoX, Llama, ...) stores ``[out, in]``; so the neuron axis is a
  column in one and a row in the other. To support a new architecture, add one entry.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

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


def hf_parameters(bridge: Any) -> dict[str, torch.nn.Parameter]:
    """HF parameter name -> the bridge's live ``nn.Parameter`` (tied names give the same object).

    Editing one in place (``p.copy_(...)`` under ``no_grad``) edits what the bridge computes with:
    its views (``attn.q`` etc.) share the storage. Left out: buffers, and parameters the bridge
    shadows with its own copies (GPT-NeoX attention), whose edits it would not see.
    """
    mapping = _map(bridge)
    return {
        n: t
        for n, t in mapping.tensors.items()
        if isinstance(t, torch.nn.Parameter) and n not in mapping.shadowed
    }


def hf_parameter(bridge: Any, hf_name: str) -> torch.nn.Parameter:
    """The live parameter behind plain HF name ``hf_name`` (e.g. ``"transformer.h.0.mlp.c_fc.weight"``)."""
    params = hf_parameters(bridge)
    if hf_name not in params and hf_name in _map(bridge).shadowed:
        raise KeyError(
            f"{hf_name!r} cannot be edited through this bridge: the bridge computes with its own "
            "copies of this module's weights, so an in-place edit would not change its outputs."
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
        if "{layer}" not in self.template:
            raise ValueError(f"template must contain '{{layer}}': {self.template!r}")
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
    residual stream. Output biases are shared by all neurons and are never touched.
    """

    inputs: tuple[NeuronSlice, ...]
    outputs: tuple[NeuronSlice, ...]

    def __post_init__(self) -> None:
        if not self.inputs or not self.outputs:
            raise ValueError("a neuron layout needs at least one input and one output slice")

    @property
    def slices(self) -> tuple[NeuronSlice, ...]:
        return self.inputs + self.outputs


# Keyed by HF architecture (the model class name, as in config.json's "architectures").
NEURON_LAYOUTS: Mapping[str, NeuronLayout] = MappingProxyType(
    {
        # Conv1D weights are [in, out]: c_fc [d_model, d_mlp], c_proj [d_mlp, d_model].
        "GPT2LMHeadModel": NeuronLayout(
            inputs=(
                NeuronSlice("transformer.h.{layer}.mlp.c_fc.weight", dim=1),
                NeuronSlice("transformer.h.{layer}.mlp.c_fc.bias", dim=0),
            ),
            outputs=(NeuronSlice("transformer.h.{layer}.mlp.c_proj.weight", dim=0),),
        ),
        # nn.Linear weights are [out, in]: dense_h_to_4h [d_mlp, d_model], dense_4h_to_h [d_model, d_mlp].
        "GPTNeoXForCausalLM": NeuronLayout(
            inputs=(
                NeuronSlice("gpt_neox.layers.{layer}.mlp.dense_h_to_4h.weight", dim=0),
                NeuronSlice("gpt_neox.layers.{layer}.mlp.dense_h_to_4h.bias", dim=0),
            ),
            outputs=(NeuronSlice("gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight", dim=1),),
        ),
        # Gated MLP, nn.Linear, no biases: neuron j is act(gate_j) * up_j, read by down's column j.
        "LlamaForCausalLM": NeuronLayout(
            inputs=(
                NeuronSlice("model.layers.{layer}.mlp.gate_proj.weight", dim=0),
                NeuronSlice("model.layers.{layer}.mlp.up_proj.weight", dim=0),
            ),
            outputs=(NeuronSlice("model.layers.{layer}.mlp.down_proj.weight", dim=1),),
        ),
    }
)


def neuron_layout(bridge_or_architecture: Any) -> NeuronLayout:
    """The ``NeuronLayout`` of a bridge (or of an architecture name such as ``"GPT2LMHeadModel"``)."""
    arch = (
        bridge_or_architecture
        if isinstance(bridge_or_architecture, str)
        else architecture(bridge_or_architecture)
    )
    if arch not in NEURON_LAYOUTS:
        raise KeyError(
            f"no MLP neuron layout for architecture {arch!r}; known: {sorted(NEURON_LAYOUTS)}. "
            "Add an entry to mechedit.hf.NEURON_LAYOUTS naming the tensors and the axis that "
            "holds the neuron index."
        )
    return NEURON_LAYOUTS[arch]


__all__ = [
    "NEURON_LAYOUTS",
    "WRAPPER_SEGMENT",
    "NeuronLayout",
    "NeuronSlice",
    "architecture",
    "hf_config",
    "hf_model",
    "hf_parameter",
    "hf_parameters",
    "hf_state_dict",
    "neuron_layout",
]
