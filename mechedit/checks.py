"""Preconditions every method checks before it trusts a model's numbers.

- ``require_eval_mode``: dropout and other training-time behaviour make two identical runs
  differ (on a GPT-2 with dropout, two attribution calls differed by ~0.02), so every method
  refuses a model with any submodule in training mode, and a gradient method refuses to run
  inside ``torch.inference_mode()`` (where autograd cannot be switched back on).
- ``check_hooks``: a hook-consistency check, per architecture, that the bridge's hooks mean what
  their names say (residual identities hold, logits equal the Hugging Face model's, shapes match
  the site table). A method can call it once before trusting patching results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


def require_eval_mode(model: Any, *, what: str = "this method", needs_grad: bool = False) -> None:
    """Raise a ``RuntimeError`` saying how to fix it if ``model`` cannot give reproducible numbers.

    Checks every submodule of ``model`` and of the HF model it wraps (``model.original_model``)
    for training mode, without changing anything. With ``needs_grad=True`` it also refuses to run
    inside ``torch.inference_mode()``: autograd cannot be re-enabled there, so a gradient method
    must be called outside it (``torch.no_grad()`` is fine: gradient methods enable grad
    themselves). ``what`` names the caller in the message (e.g. ``"neuron_attribution"``).
    """
    if needs_grad and torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs gradients, but it was called inside torch.inference_mode(), where "
            "autograd cannot be switched back on. Call it outside the inference_mode block "
            "(torch.no_grad() around it is fine)."
        )
    training: dict[int, str] = {}
    for prefix, root in (("model", model), ("model.original_model", getattr(model, "original_model", None))):
        if not isinstance(root, torch.nn.Module):
            continue
        for name, module in root.named_modules():
            if module.training:
                training.setdefault(id(module), f"{prefix}.{name}" if name else prefix)
    if training:
        names = list(training.values())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise RuntimeError(
            f"{what} needs the model in evaluation mode (dropout off, so identical runs give "
            f"identical numbers), but these modules are in training mode: {shown}. "
            "Call model.eval() first (mechedit.load returns the model in eval mode)."
        )


@dataclass(frozen=True)
class Identity:
    """One checked equation: its largest absolute error and the tolerance it must stay under.

    ``tolerance = atol + rtol * scale`` with ``scale`` the largest absolute value of the
    right-hand side, so the check is relative to the size of the activations.
    """

    name: str
    max_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance


@dataclass(frozen=True)
class HookCheck:
    """The result of ``check_hooks``: do this model's hooks mean what their names say?

    Attributes:
        architecture: the HF model class (``"GPT2LMHeadModel"``).
        residual: the residual form from ``components.ARCHITECTURES`` (``"sequential"``,
            ``"parallel"``, ``"post_ln"``) or ``"unknown"``.
        tokens: the token ids checked (one row).
        identities: every equation checked (residual sums, block chaining, embeddings, bridge
            logits against the HF model run on its own), with max errors.
        shape_problems: hooks whose tensor shape differs from the site table's ``dims``.
        notes: what was deliberately not checked and why (BERT's post-LN sums, the table's
            edit caveats).
    """

    architecture: str
    residual: str
    tokens: tuple[int, ...]
    identities: tuple[Identity, ...]
    shape_problems: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """True when every identity holds within tolerance and every shape matches."""
        return not self.shape_problems and all(i.passed for i in self.identities)

    @property
    def failures(self) -> list[str]:
        """Readable lines for what failed (empty when ``passed``)."""
        lines = [
            f"{i.name}: max error {i.max_error:.3g} > tolerance {i.tolerance:.3g}"
            for i in self.identities
            if not i.passed
        ]
        return lines + list(self.shape_problems)

    def require(self) -> HookCheck:
        """Return self if passed; else a ``RuntimeError`` listing what failed."""
        if not self.passed:
            raise RuntimeError(
                f"the hooks of this {self.architecture} do not mean what their names say:\n  "
                + "\n  ".join(self.failures)
                + "\nPatching or attribution results read from these hooks cannot be trusted."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for provenance); identities carry their ``passed`` flag."""
        data = asdict(self)
        data["tokens"] = list(self.tokens)
        data["identities"] = [{**asdict(i), "passed": i.passed} for i in self.identities]
        data["shape_problems"] = list(self.shape_problems)
        data["notes"] = list(self.notes)
        data["passed"] = self.passed
        return data


def _independent_hf_model(model: Any) -> torch.nn.Module:
    """The HF model class rebuilt around the bridge's own tensors, with no bridge hooks in it.

    ``model.original_model`` cannot serve as the reference: its submodules are the bridge's
    wrappers, so its forward runs the same hooks. Built on the meta device and given the live
    tensors (``assign=True``), so no weights are copied.
    """
    from mechedit.hf import hf_config, hf_model, hf_state_dict

    original = hf_model(model)
    config = hf_config(model)
    with torch.device("meta"):
        reference = type(original)(config)
    reference.load_state_dict(hf_state_dict(model), strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies, causal masks) are not in the state dict.
    live_buffers = {
        ".".join(p for p in name.split(".") if p != "_original_component"): buf
        for name, buf in original.named_buffers(remove_duplicate=False)
    }
    for name, buffer in list(reference.named_buffers()):
        if buffer.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = reference.get_submodule(owner_name) if owner_name else reference
            if name not in live_buffers:
                raise RuntimeError(f"cannot rebuild buffer {name!r} of the HF model for check_hooks")
            owner.register_buffer(leaf, live_buffers[name], persistent=False)
    return reference.eval()


def _default_tokens(model: Any) -> torch.Tensor:
    # Spread over the vocabulary, deterministic, no tokenizer needed: identities hold for any ids.
    d_vocab = int(model.cfg.d_vocab)
    return ((torch.arange(8) * 7919 + 3) % d_vocab).unsqueeze(0)


def check_hooks(
    model: Any,
    tokens: torch.Tensor | None = None,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> HookCheck:
    """Check on one short input that ``model``'s hooks mean what their names say.

    Per architecture (``components.ARCHITECTURES``), on ``tokens`` (``[1, pos]``; default: 8
    fixed ids spread over the vocabulary):

    - sequential (GPT-2, Llama): ``resid_pre + attn_out == resid_mid`` and
      ``resid_mid + mlp_out == resid_post``; parallel (GPT-NeoX):
      ``resid_pre + attn_out + mlp_out == resid_post``; post-LN (BERT):
      ``resid_mid == LN1(resid_pre + attn_out)`` and ``resid_post == LN2(resid_mid + mlp_out)``
      with the block's own LayerNorms (the plain sums do not hold there);
    - ``resid_post[l] == resid_pre[l + 1]``, and ``resid_pre[0] == embed (+ pos_embed)`` for
      pre-LN architectures;
    - the bridge's logits equal those of the HF model class run on the same tensors without the
      bridge (``model.original_model`` would run the bridge's hooks too);
    - edited runs: with seeded noise added at one site (``resid_pre``, ``resid_mid``,
      ``attn_out``, ``mlp_out``) in every layer, each equation with that site as an input must
      still hold, i.e. an edit at the hook flows on as its name says. Sites with an
      ``edit_caveats`` entry in the table are skipped and named in ``notes`` (on GPT-2 and Llama
      an edit at ``hook_resid_mid`` reaches only the MLP: measured, see ``ARCHITECTURES``);
    - every available site's hook tensor has the shape the site table's ``dims`` give.

    Errors are max absolute differences; an identity passes under ``atol + rtol * scale``
    (``scale``: the largest absolute value of the right-hand side). Raises ``RuntimeError`` in
    training mode. Call ``.require()`` on the result to raise when something failed.
    """
    from mechedit import components as comp
    from mechedit.gradients import capture_activations
    from mechedit.hf import architecture
    from mechedit.models import model_device

    require_eval_mode(model, what="check_hooks")
    tokens = _default_tokens(model) if tokens is None else tokens
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be one row [1, pos], got shape {tuple(tokens.shape)}")
    tokens = tokens.to(model_device(model))
    arch = comp.architecture_sites(model)
    residual = "unknown" if arch is None else arch.residual_form(model.original_model.config)
    n_layers = int(model.cfg.n_layers)
    sites = [s for s in comp.available_sites(model) if comp.SITES[s].hook is not None]
    names = {
        (site, layer): comp.hook_name(site, layer)
        for site in sites
        for layer in (range(n_layers) if comp.SITES[site].per_layer else [0])
    }
    # Post-LN: the bridge's attn_out / resid_mid hooks are not sites there (see ARCHITECTURES),
    # but what they hold is checked under their raw names.
    raw_names = (
        {
            (layer, key): f"blocks.{layer}.{hook}"
            for layer in range(n_layers)
            for key, hook in (("attn_add", "attn.o.hook_out"), ("attn_out", "hook_attn_out"), ("sum", "hook_resid_mid"))
        }
        if residual == "post_ln"
        else {}
    )
    captured = capture_activations(model, tokens, list(dict.fromkeys([*names.values(), *raw_names.values()])))
    acts = {key: captured.activations[name].double() for key, name in names.items()}
    post_ln: dict[int, dict[str, torch.Tensor]] = {}
    for (layer, key), name in raw_names.items():
        post_ln.setdefault(layer, {})[key] = captured.activations[name].double()

    identities: list[Identity] = []
    notes: list[str] = []

    def check(name: str, lhs: torch.Tensor, rhs: torch.Tensor) -> None:
        error = (lhs.double() - rhs.double()).abs().max().item()
        scale = rhs.double().abs().max().item()
        identities.append(Identity(name, error, atol + rtol * scale))

    def a(site: str, layer: int = 0) -> torch.Tensor:
        return acts[(site, layer)]

    # Residual equations as data: (inputs, output), each a (site, layer) key.
    equations: list[tuple[list[tuple[str, int]], tuple[str, int]]] = []
    for layer in range(n_layers):
        if residual == "sequential":
            equations.append(([("resid_pre", layer), ("attn_out", layer)], ("resid_mid", layer)))
            equations.append(([("resid_mid", layer), ("mlp_out", layer)], ("resid_post", layer)))
        elif residual == "parallel":
            equations.append(([("resid_pre", layer), ("attn_out", layer), ("mlp_out", layer)], ("resid_post", layer)))
        if layer + 1 < n_layers and residual != "unknown":
            equations.append(([("resid_post", layer)], ("resid_pre", layer + 1)))

    def label(inputs: list[tuple[str, int]], output: tuple[str, int]) -> str:
        layer = inputs[0][1]
        if output[1] != layer:
            return f"L{layer}: resid_post == L{output[1]} resid_pre"
        return f"L{layer}: {' + '.join(s for s, _ in inputs)} == {output[0]}"

    for inputs, output in equations:
        check(label(inputs, output), sum(a(*key) for key in inputs), a(*output))
    for layer in range(n_layers) if residual == "post_ln" else []:
        block, raw = model.blocks[layer], post_ln[layer]
        with torch.no_grad():
            dtype = next(block.parameters()).dtype
            mid = block.ln1((a("resid_pre", layer) + raw["attn_add"]).to(dtype))
            post = block.ln2(raw["sum"].to(dtype))
        check(f"L{layer}: hook_attn_out == LN1(resid_pre + attn.o.hook_out)", raw["attn_out"], mid)
        check(f"L{layer}: hook_resid_mid == hook_attn_out + mlp_out", raw["attn_out"] + a("mlp_out", layer), raw["sum"])
        check(f"L{layer}: resid_post == LN2(hook_resid_mid)", a("resid_post", layer), post)
        if layer + 1 < n_layers:
            check(f"L{layer}: resid_post == L{layer + 1} resid_pre", a("resid_post", layer), a("resid_pre", layer + 1))

    # Edited runs: a hook means its name only if an edit there flows on as the name says. Add
    # noise at one site in every layer; each equation with that site as an input must still hold.
    caveats = comp.edit_caveats(model)
    for site in ("resid_pre", "resid_mid", "attn_out", "mlp_out"):
        if residual not in ("sequential", "parallel") or site not in sites:
            continue
        if site in caveats:
            notes.append(f"{site} edits not checked: {caveats[site]}")
            continue
        generator = torch.Generator().manual_seed(0)

        def nudge(activation: torch.Tensor, hook: Any, generator=generator) -> torch.Tensor:  # noqa: ARG001
            noise = torch.randn(activation.shape, generator=generator, dtype=torch.float64)
            return activation + noise.to(activation.device, activation.dtype)

        edits = [(comp.hook_name(site, layer), nudge) for layer in range(n_layers)]
        with model.hooks(fwd_hooks=edits):
            edited = capture_activations(model, tokens, list(dict.fromkeys(names.values())))
        for inputs, output in equations:
            if site in (s for s, _ in inputs) and output[0] != site:
                lhs = sum(edited.activations[names[key]].double() for key in inputs)
                check(f"{label(inputs, output)} (with {site} edited)", lhs, edited.activations[names[output]].double())

    if residual in ("sequential", "parallel"):
        has_pos = "pos_embed" in sites
        embedded = a("embed") + (a("pos_embed") if has_pos else 0)
        check("embed + pos_embed == L0 resid_pre" if has_pos else "embed == L0 resid_pre", embedded, a("resid_pre", 0))
    elif residual == "post_ln":
        notes.append(
            "post-LayerNorm: resid_pre + attn_out == resid_mid does not hold (a LayerNorm follows "
            "each sum, and the bridge's hook_attn_out is the normalised residual, hook_resid_mid "
            "the sum after the MLP), so the equations the bridge does satisfy are checked with "
            "the block's own LayerNorms; L0 resid_pre (LN of token + position + token-type "
            "embeddings) is not checked"
        )
    else:
        notes.append("architecture not in components.ARCHITECTURES: residual identities not checked")

    with torch.no_grad():
        reference = _independent_hf_model(model)(input_ids=tokens).logits
    check("bridge logits == HF model logits", captured.logits, reference)

    shape_problems = []
    sizes = {
        "batch": 1,
        "pos": tokens.shape[1],
        "key_pos": tokens.shape[1],
        "d_model": int(model.cfg.d_model),
        "d_head": int(model.cfg.d_head),
    }
    for (site, layer), name in names.items():
        spec = comp.SITES[site]
        dims = {**sizes, **({spec.index: comp.index_size(model, site)} if spec.index else {})}
        expected = tuple(dims[d] for d in spec.dims)
        actual = tuple(acts[(site, layer)].shape)
        if actual != expected:
            shape_problems.append(f"{name}: shape {actual}, the site table says {expected} {spec.dims}")
    return HookCheck(
        architecture=architecture(model),
        residual=residual,
        tokens=tuple(int(t) for t in tokens[0].tolist()),
        identities=tuple(identities),
        shape_problems=tuple(dict.fromkeys(shape_problems)),
        notes=tuple(notes),
    )


def hook_check_record(model: Any, hook_check: HookCheck | bool = True) -> dict[str, Any]:
    """Run (``True``) or reuse (a ``HookCheck``) the hook check before a locator trusts hooks.

    Raises the check's ``RuntimeError`` when it failed; returns the summary locators put in
    their provenance (``{"run": False}`` for ``hook_check=False``). Running it costs a few short
    forwards; pass one ``HookCheck`` to many calls on the same model to run it once.
    """
    if hook_check is False:
        return {"run": False}
    result = check_hooks(model) if hook_check is True else hook_check
    if not isinstance(result, HookCheck):
        raise ValueError(f"hook_check must be True, False or a HookCheck, got {type(hook_check).__name__}")
    result.require()
    return {"run": True, "passed": result.passed, "architecture": result.architecture,
            "residual": result.residual, "n_identities": len(result.identities), "notes": list(result.notes)}
