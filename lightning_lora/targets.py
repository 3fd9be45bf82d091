"""Which modules a config names: matching ``target_modules`` / ``exclude_modules`` /
``trainable_modules`` against a model, with errors that list what the model does have.

Patterns follow PEFT: a list entry matches a module whose name equals it or ends with ``"." +
entry``; one string is a regular expression over the full name; ``"all-linear"`` takes every
linear layer (:data:`LAYER_TYPES` says which types count, as PEFT counts them: conv and embedding
layers are adapted only when named) except the model's output layer (PEFT's rule:
:func:`~lightning_lora.sharing.output_layers`), and warns about the weight layers it leaves out.
Unlike PEFT, every list entry must match something, so a typo fails loudly. ``exclude_modules``
and ``trainable_modules`` apply before any type check: an excluded module is never looked at.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from . import base_init
from .config import ALL_LINEAR, LoRAConfig
from .errors import LoRATargetError
from .layer_types import LINEAR_TYPES, READS_CHILD_WEIGHTS, SUPPORTED, layer_type
from .layers import LoRAWrapper
from .names import QKV, parse_weight_name
from .sharing import output_layers


@dataclass(frozen=True)
class Selected:
    """A module ``inject_lora`` will adapt, with its parent (to swap it there)."""

    name: str
    module: nn.Module
    parent: nn.Module | None
    with_out_proj: bool = True  # for an nn.MultiheadAttention: adapt its out_proj as well


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """(name, module, parent) for every module a pattern may name: a LoRA wrapper stands for the
    module it wraps, and LoRA's own internals (banks, parametrizations) are never candidates."""
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module, parent: nn.Module | None) -> Iterator[Any]:
        if id(module) in seen:
            return
        seen.add(id(module))
        if prefix:
            yield prefix, module, parent
        if isinstance(module, LoRAWrapper):
            return
        for child_name, child in module.named_children():
            if child_name == "parametrizations" and parametrize.is_parametrized(module):
                continue
            yield from visit(f"{prefix}.{child_name}" if prefix else child_name, child, module)

    yield from visit("", model, None)


def _supported(module: nn.Module) -> bool:
    return layer_type(module) is not None


def _linear(module: nn.Module) -> bool:
    kind = layer_type(module)
    return kind is not None and kind.all_linear


def _weight_layer(module: nn.Module) -> bool:
    """A layer with a weight matrix (or kernel) of its own: what ``"all-linear"`` reports when
    it leaves one out. Embeddings are not counted: no one means them by "all-linear"."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() >= 2 and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def _matches(name: str, pattern: str) -> bool:
    """PEFT's rule for a list entry: the full name, or a dotted suffix of it."""
    return name == pattern or name.endswith("." + pattern)


def _short_names(names: Iterable[str]) -> str:
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    shown = [f"{k} ({v})" if v > 1 else k for k, v in counts.most_common(8)]
    more = f", ... ({len(counts) - 8} more)" if len(counts) > 8 else ""
    return ", ".join(shown) + more


def _no_match_message(field_name: str, pattern: str, candidates: list[str], adaptable: list[str]) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    close = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], short, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = _short_names(adaptable) if adaptable else "none"
    return f"{field_name} entry {pattern!r} matched no module.{hint} Adaptable modules here ({SUPPORTED}): {listing}."


def _select(
    walked: list[tuple[str, nn.Module, nn.Module | None]], patterns: list[str], field_name: str
) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """The walked modules that the name/suffix list ``patterns`` selects, in pattern order;
    every entry must select at least one module, so a typo fails instead of selecting nothing."""
    selected: list[tuple[str, nn.Module, nn.Module | None]] = []
    for pattern in patterns:
        hits = [w for w in walked if _matches(w[0], pattern)]
        if not hits:
            names = [n for n, _, _ in walked]
            adaptable = [n for n, m, _ in walked if _supported(m)]
            raise LoRATargetError(_no_match_message(field_name, pattern, names, adaptable))
        selected.extend(h for h in hits if h not in selected)
    return selected


def resolve_modules(model: nn.Module, patterns: list[str], field_name: str) -> list[str]:
    """Names of the modules that the name/suffix list ``patterns`` selects (see :func:`_select`)."""
    return [n for n, _, _ in _select(list(_walk(model)), patterns, field_name)]


def find_targets(model: nn.Module, config: LoRAConfig) -> list[Selected]:
    """The modules ``config`` adapts, checked: excluded modules and ``trainable_modules`` are
    removed first, then every module left must be a supported type."""
    walked = list(_walk(model))
    adaptable = [n for n, m, _ in walked if _supported(m)]
    excluded = set(resolve_modules(model, config.exclude_modules, "exclude_modules"))
    trainable = resolve_modules(model, config.trainable_modules, "trainable_modules")

    def kept(name: str) -> bool:
        inside_trainable = any(name == t or name.startswith(t + ".") for t in trainable)
        return name not in excluded and not inside_trainable

    spec = config.target_modules
    if spec == ALL_LINEAR:
        chosen = _all_linear(model, [w for w in walked if kept(w[0])])
    elif isinstance(spec, str):
        regex = re.compile(spec)
        chosen = [(n, m, p) for n, m, p in walked if regex.fullmatch(n)]
        if not chosen:
            raise LoRATargetError(
                f"target_modules regex {spec!r} matched no module name (it must match the whole "
                f"name, e.g. r'.*\\.(query|value)'). Adaptable modules here: {_short_names(adaptable)}."
            )
    else:
        chosen = _select(walked, spec, "target_modules")
    chosen = [(n, m, p) for n, m, p in chosen if kept(n)]
    unsupported = [(n, m) for n, m, _ in chosen if not _supported(m)]
    if unsupported:
        name, module = unsupported[0]
        inner = [n for n in adaptable if n.startswith(name + ".")][:3]
        fix = (
            f" Target its layers instead, e.g. {inner}."
            if inner
            else f" Leave it out with exclude_modules=[{name!r}], or train it in full with trainable_modules."
        )
        raise LoRATargetError(
            f"target_modules={spec!r} selects {name!r} of type {type(module).__name__}, which "
            f"LoRA cannot adapt (supported: {SUPPORTED}).{fix}"
        )
    _refuse_inexact(chosen, spec)
    if config.use_dora:
        _refuse_dora(chosen, spec)
    if base_init.changes_base(config.init):
        _refuse_base_init(chosen, spec, config.init)
    if config.use_dora or base_init.changes_base(config.init):
        _refuse_meta(chosen, f"use_dora={config.use_dora}, init={config.init!r}")
    names = {n for n, _, _ in chosen}
    # An out_proj inside a chosen MultiheadAttention is adapted with it, not on its own.
    chosen = [
        (n, m, p) for n, m, p in chosen if not (isinstance(p, nn.MultiheadAttention) and n.rsplit(".", 1)[0] in names)
    ]
    if not chosen:
        raise LoRATargetError(
            f"target_modules={spec!r} matched only modules that exclude_modules or "
            f"trainable_modules remove; nothing is left to adapt."
        )
    return [Selected(n, m, p, with_out_proj=f"{n}.out_proj" not in excluded) for n, m, p in chosen]


def _all_linear(
    model: nn.Module, walked: list[tuple[str, nn.Module, nn.Module | None]]
) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """PEFT's ``"all-linear"``: every linear layer except the output layer. The weight layers it
    leaves out (convs, which LoRA adapts when named; types LoRA cannot adapt) are reported in
    one warning, or in the error if nothing is left, so a model never trains only its head
    without a word."""
    outputs = output_layers(model)
    inside = {id(m) for _, m, _ in walked if _supported(m)}
    chosen = [(n, m, p) for n, m, p in walked if _linear(m) and id(m) not in outputs]
    left = [(n, m) for n, m, p in walked if _weight_layer(m) and not _linear(m) and id(p) not in inside]
    adaptable = [(n, m) for n, m in left if _supported(m) and not (layer_type(m).refusal(m) or "")]
    named = Counter(type(m).__name__ for _, m in adaptable)
    unsupported = Counter(type(m).__name__ for n, m in left if (n, m) not in adaptable)
    output = next((n for n, m, _ in walked if id(m) in outputs and _linear(m)), None)
    parts = []
    if named:
        kinds = ", ".join(f"{k} ({v})" for k, v in named.most_common())
        parts.append(
            f"{kinds}, which it does not count as linear (PEFT's meaning): name them in target_modules to adapt them"
        )
    if unsupported:
        kinds = ", ".join(f"{k} ({v})" for k, v in unsupported.most_common())
        parts.append(f"{kinds}, which LoRA cannot adapt (exactly; supported: {SUPPORTED})")
    what = (
        f"target_modules='{ALL_LINEAR}' leaves out {len(left)} weight layer(s) of {type(model).__name__}, "
        f"e.g. {left[0][0]!r}: {'; '.join(parts)}."
        if left
        else ""
    )
    if not chosen:
        out = f" (the output layer {output!r} is left out, as PEFT does)" if output else ""
        raise LoRATargetError(
            f"target_modules='{ALL_LINEAR}' found no {LINEAR_TYPES} in {type(model).__name__}{out}; "
            f"nothing is left to adapt. {what}".rstrip()
        )
    if left:
        warnings.warn(
            f"{what} They stay frozen; {len(chosen)} module(s) are adapted. List them in exclude_modules "
            f"(or trainable_modules) to silence this.",
            stacklevel=4,
        )
    return chosen


def _refuse_inexact(chosen: list[tuple[str, nn.Module, nn.Module | None]], spec: Any) -> None:
    """Refuse a selected module of a supported type that LoRA cannot adapt exactly (a grouped
    conv, an embedding with ``max_norm``, ...), naming it, the reason and the fix."""
    for name, module, _ in chosen:
        kind = layer_type(module)
        reason = kind.refusal(module) if kind is not None and not isinstance(module, LoRAWrapper) else None
        if reason:
            raise LoRATargetError(
                f"target_modules={spec!r} selects {name!r} ({type(module).__name__}), which LoRA cannot adapt "
                f"exactly: {reason}. Leave it out: exclude_modules=[{name!r}]."
            )


def _refuse_dora(chosen: list[tuple[str, nn.Module, nn.Module | None]], spec: Any) -> None:
    """With ``use_dora``, refuse a selected module DoRA cannot run on (a conv, an embedding, an
    ``nn.MultiheadAttention`` or a Linear its parent reads the weight of, a quantized base),
    naming it, the reason and the fix."""
    for name, module, parent in chosen:
        base = module.base_layer if isinstance(module, LoRAWrapper) else module
        kind = layer_type(base)
        reason = kind.dora_refusal(base) if kind is not None else None
        if reason is None and isinstance(parent, READS_CHILD_WEIGHTS):
            reason = (
                f"its parent {type(parent).__name__} reads its weight directly, so it is adapted through a weight "
                f"parametrization, where DoRA is not implemented"
            )
        if reason:
            raise LoRATargetError(
                f"use_dora=True, but target_modules={spec!r} selects {name!r} ({type(base).__name__}): {reason}. "
                f"Leave it out (exclude_modules=[{name!r}]), or set use_dora=False."
            )


def _refuse_meta(chosen: list[tuple[str, nn.Module, nn.Module | None]], what: str) -> None:
    """Refuse an adapter computed from ``W`` (DoRA's magnitude, PiSSA's factors) on a module whose
    weight is on the meta device: ``W`` holds no values yet, and the pretrained ones arrive later."""
    for name, module, _ in chosen:
        base = module.base_layer if isinstance(module, LoRAWrapper) else module
        if any(p.is_meta for p in base.parameters(recurse=False)):
            raise LoRATargetError(
                f"{what} computes the adapter from W, but {name!r} is on the meta device (materialised "
                f"and loaded only later, e.g. under trainer.init_module(empty_init=True)). Inject after the "
                f"pretrained weights are loaded, or use a plain LoRA adapter (use_dora=False, init='zeros_b')."
            )


def _refuse_base_init(chosen: list[tuple[str, nn.Module, nn.Module | None]], spec: Any, init: str) -> None:
    """With a base-changing ``init`` (PiSSA, OLoRA), refuse a selected module it cannot rewrite
    exactly (not a Linear or Conv1D wrapper, a weight its parent reads directly, a quantized or
    non-float weight), naming it, the reason and the fix."""
    for name, module, parent in chosen:
        base = module.base_layer if isinstance(module, LoRAWrapper) else module
        kind = layer_type(base)
        wrapper = kind.wrapper if kind is not None else None
        if wrapper is None or not wrapper.supports_base_init:
            reason = f"init={init!r} is implemented for nn.Linear and transformers' Conv1D only, as in PEFT"
        elif isinstance(parent, READS_CHILD_WEIGHTS):
            reason = f"its parent {type(parent).__name__} reads its weight directly (a weight parametrization)"
        else:
            reason = base_init.refusal(base, wrapper.transposed, init)
        if reason:
            raise LoRATargetError(
                f"init={init!r}, but target_modules={spec!r} selects {name!r} ({type(base).__name__}): {reason}. "
                f"Leave it out (exclude_modules=[{name!r}]), or use init='zeros_b'."
            )


def _prefix_hint(missing: str, module_names: Iterable[str]) -> str:
    """Names that differ only by a leading prefix are the usual reason for a missing module:
    an adapter saved from a wrapper (``encoder.layer.0...``) loaded into the bare model."""
    names = set(module_names)
    parts = missing.split(".")
    for k in range(1, len(parts)):
        if ".".join(parts[k:]) in names:
            return f" The names differ by a prefix: this model has {'.'.join(parts[k:])!r}, without {'.'.join(parts[:k]) + '.'!r}."
    longer = sorted(n for n in names if n.endswith("." + missing))
    if longer:
        return f" The names differ by a prefix: this model has {longer[0]!r}."
    return ""


def target_fields(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """The ``target_modules``, ``exclude_modules`` and ``mha_projections`` with which
    :func:`inject_lora` adapts exactly the weights ``names`` (named as :func:`lora_layers` names
    them) of ``model``: how an adapter file or a combination of adapters becomes a config.

    A q/k/v block selects its ``nn.MultiheadAttention``; that module's ``out_proj`` is excluded
    unless ``names`` has it. Raises :class:`LoRATargetError` naming a module ``model`` lacks.
    """
    names = list(names)
    modules = [n for n, _, _ in _walk(model)]
    known = set(modules)
    targets: list[str] = []
    labels: set[str] = set()
    parsed = {name: parse_weight_name(name) for name in names}
    owners = {p.module for p in parsed.values() if p.label}
    for name, p in parsed.items():
        owner, label = p.module, p.label
        if owner not in known:
            raise LoRATargetError(
                f"no module named {owner!r} in this {type(model).__name__}.{_prefix_hint(owner, modules)}"
            )
        if label:
            labels.add(label)
        elif name.endswith(".out_proj") and name.rsplit(".", 1)[0] in owners:
            continue  # adapted together with its nn.MultiheadAttention
        if owner not in targets:
            targets.append(owner)
    return {
        "target_modules": targets,
        "exclude_modules": sorted(f"{o}.out_proj" for o in owners if f"{o}.out_proj" not in names),
        "mha_projections": [p for p in QKV if p in labels] or list(QKV),
    }
