"""Adapter roots: naming an adapter after the model that will be served, not the one trained.

LoRA is injected into what the trainer holds, e.g. a LightningModule whose attribute ``model``
is a Hugging Face ``LlamaForCausalLM``; its weights are then named ``model.model.layers.0...``.
The model that gets served (``PeftModel.from_pretrained(LlamaForCausalLM(...), dir)``, vLLM)
names them ``model.layers.0...``. An adapter file written *relative to a root* (the submodule
``model``) uses the served names and records the stripped root in its metadata;
:func:`fit_file` loads either form into either model.

* :func:`default_adapter_root` finds the root of a wrapper by duck typing (no Lightning or
  transformers import): the single chain of children that holds every adapted weight and
  trained module, down to the first one that looks like a Hugging Face model (``config`` and
  ``save_pretrained``). ``None`` when the model is itself such a model, or there is none.
* :func:`rebase` rewrites a file's names relative to a root; :func:`fit_file` finds how a
  file's names fit a model: as written, under the recorded root, or under the one prefix
  (added or stripped) that fits every name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import AdapterFileError, LoRATargetError
from .names import FILE_PREFIX, parse_weight_name
from .params import trainable_module_names
from .state import adapted_weights

if TYPE_CHECKING:
    from .adapter_file import AdapterFile

AUTO = "auto"
"""``adapter_root="auto"``: use :func:`default_adapter_root`."""


def _servable(module: nn.Module) -> bool:
    """Looks like a model a serving stack loads by itself: a Hugging Face ``PreTrainedModel``
    (or a diffusers model), recognised by its ``config`` and ``save_pretrained``."""
    return getattr(module, "config", None) is not None and callable(getattr(module, "save_pretrained", None))


def _under(name: str, root: str) -> bool:
    return name.startswith(root + ".")


def default_adapter_root(model: nn.Module, owners: Iterable[str] | None = None) -> str | None:
    """The submodule of ``model`` whose names an adapter file should use: following the single
    child that holds every module in ``owners`` (default: every adapted weight's module and every
    trainable module), the first one that looks like a Hugging Face model. ``None`` (full names)
    if ``model`` is one itself, or the chain ends before reaching one."""
    if _servable(model):
        return None
    if owners is None:
        owners = [parse_weight_name(t.name).module for t in adapted_weights(model)] + trainable_module_names(model)
    owners = list(owners)
    if not owners:
        return None
    path, module = "", model
    while True:
        holding = [c for c in module._modules if all(_under(o, f"{path}{c}") for o in owners)]
        if len(holding) != 1:
            return None
        path, module = f"{path}{holding[0]}", module._modules[holding[0]]
        if module is None:
            return None
        if _servable(module):
            return path
        path += "."


def resolve_root(model: nn.Module, root: str | None) -> str | None:
    """``root`` checked against ``model`` (``"auto"``: :func:`default_adapter_root`; ``None`` or
    ``""``: the model itself)."""
    if root == AUTO:
        return default_adapter_root(model)
    if not root:
        return None
    try:
        model.get_submodule(root)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise LoRATargetError(
            f"root={root!r}: {type(model).__name__} has no submodule of that name (its children: {children}). "
            f"Pass the attribute that holds the served model, e.g. root='model', or root=None for full names."
        ) from None
    return root


def served_name_or_path(model: nn.Module, root: str | None) -> str | None:
    """The Hugging Face ``name_or_path`` of the served model (``root`` of ``model``), if known."""
    try:
        served = model.get_submodule(root) if root else model
    except AttributeError:
        return None
    name = getattr(getattr(served, "config", None), "name_or_path", None)
    return name if isinstance(name, str) and name else None


def relative(name: str, root: str | None, what: str = "adapted weight") -> str:
    """``name`` relative to ``root``; an error naming both when it lies outside."""
    if not root:
        return name
    if not _under(name, root):
        raise LoRATargetError(
            f"{what} {name!r} lies outside root {root!r}, so a file named relative to {root!r} cannot hold it. "
            f"Save with root=None (full names), or adapt and train only modules inside {root!r}."
        )
    return name[len(root) + 1 :]


def rebase(tensors: dict[str, Any], peft: dict[str, Any], root: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The file's tensors and PEFT config with every module name relative to ``root``."""
    if not root:
        return tensors, peft
    peft = dict(peft)
    for field, what in (("modules_to_save", "trainable module"), ("target_modules", "adapted module")):
        if peft.get(field):
            peft[field] = [relative(n, root, what) for n in peft[field]]
    if peft.get("exclude_modules"):
        peft["exclude_modules"] = [relative(n, root, "excluded module") for n in peft["exclude_modules"]]
    for field in ("rank_pattern", "alpha_pattern"):
        peft[field] = {relative(k, root): v for k, v in (peft.get(field) or {}).items()}
    out = {FILE_PREFIX + relative(k.removeprefix(FILE_PREFIX), root, "tensor"): v for k, v in tensors.items()}
    return out, peft


# -------------------------------------------------------------------------------------- load


def _rename(file: AdapterFile, fn: Callable[[str], str]) -> AdapterFile:
    """``file`` with every module name passed through ``fn`` (pairs, trainable tensors, and the
    config's exact-name entries; PEFT's suffix patterns keep matching as they are)."""
    exact = set(file.pairs) | {k.rsplit(".", 1)[0] for k in file.trainable}
    config = dict(file.config)
    for field in ("rank_pattern", "alpha_pattern"):
        config[field] = {fn(k) if k in exact else k: v for k, v in (config.get(field) or {}).items()}
    if config.get("modules_to_save"):
        config["modules_to_save"] = [fn(n) if n in exact else n for n in config["modules_to_save"]]
    extras = dict(file.extras)
    if extras.get("fan_in_fan_out"):
        extras["fan_in_fan_out"] = [fn(n) for n in extras["fan_in_fan_out"]]
    return replace(
        file,
        config=config,
        extras=extras,
        pairs={fn(n): ab for n, ab in file.pairs.items()},
        trainable={fn(k): t for k, t in file.trainable.items()},
        embedding=frozenset(fn(n) for n in file.embedding),
        alphas={fn(n): a for n, a in file.alphas.items()},
        magnitudes={fn(n): m for n, m in file.magnitudes.items()},
    )


def _fits(owners: list[str], modules: set[str], fn: Callable[[str], str]) -> int:
    return sum(fn(o) in modules for o in owners)


def fit_file(model: nn.Module, file: AdapterFile, root: str | None = None) -> AdapterFile:
    """``file`` with its names as ``model`` names its modules.

    ``root`` given: the file's names are relative to that submodule (``""``: to ``model``).
    Otherwise tried in turn: the names as written; under the root recorded at save; the one
    prefix that, added or stripped, fits every name (used with a warning naming it). A file that
    fits under several prefixes, or under none, is refused with the prefix that fits best."""
    modules = {n for n, _ in model.named_modules()}
    owners = sorted({parse_weight_name(n).module for n in file.pairs})
    where = str(file.path)

    def add(prefix: str) -> Callable[[str], str]:
        return lambda n: f"{prefix}.{n}" if prefix else n

    def strip(prefix: str) -> Callable[[str], str]:
        return lambda n: n.removeprefix(prefix + ".")

    if root is not None:
        resolve_root(model, root or None)
        fn = add(root)
        if _fits(owners, modules, fn) < len(owners):
            missing = next(o for o in owners if fn(o) not in modules)
            raise AdapterFileError(
                f"adapter {where!r} does not fit under root {root!r}: this model has no module {fn(missing)!r}."
                + _best_prefix_hint(owners, modules)
            )
        return _rename(file, fn) if root else file
    if _fits(owners, modules, add("")) == len(owners):
        return file
    recorded = file.extras.get("root")
    if recorded and _fits(owners, modules, add(recorded)) == len(owners):
        return _rename(file, add(recorded))
    options = {
        label: fn for label, fn in _candidates(owners, modules, add, strip) if _fits(owners, modules, fn) == len(owners)
    }
    if len(options) == 1:
        label, fn = next(iter(options.items()))
        warnings.warn(f"adapter {where!r}: its names fit this {type(model).__name__} {label}.", stacklevel=3)
        return _rename(file, fn)
    if len(options) > 1:
        raise AdapterFileError(
            f"adapter {where!r} fits this {type(model).__name__} in several ways ({'; '.join(options)}); "
            f"say which with load_adapter(model, path, root=...)."
        )
    if _fits(owners, modules, add("")):
        return file  # the names are this model's, some are missing: the load names the first one
    raise AdapterFileError(
        f"adapter {where!r} does not fit this {type(model).__name__}: it has weights for {owners[0]!r}"
        f"{f' (and {len(owners) - 1} more)' if len(owners) > 1 else ''}, and neither these names nor "
        f"the same names under another prefix are modules here." + _best_prefix_hint(owners, modules)
    )


def _candidates(
    owners: list[str], modules: set[str], add: Callable[[str], Callable], strip: Callable[[str], Callable]
) -> list[tuple[str, Callable[[str], str]]]:
    """Prefixes worth trying: each leading run of segments all names share (stripped), and each
    path under which this model has the first name (added)."""
    found: list[tuple[str, Callable[[str], str]]] = []
    parts = [o.split(".") for o in owners]
    for k in range(1, min(len(p) for p in parts)):
        lead = parts[0][:k]
        if all(p[:k] == lead for p in parts):
            prefix = ".".join(lead)
            found.append((f"without the prefix {prefix + '.'!r}", strip(prefix)))
    for m in sorted(modules):
        if not m.endswith("." + owners[0]):
            continue
        prefix = m[: -len(owners[0]) - 1]
        found.append((f"under the prefix {prefix + '.'!r}", add(prefix)))
    return found


def _best_prefix_hint(owners: list[str], modules: set[str]) -> str:
    """Which prefix fits most of the names, and which name it misses."""
    best: tuple[int, str, str] | None = None
    for owner in owners:
        for m in modules:
            if m.endswith("." + owner):
                prefix = m[: -len(owner) - 1]
                hits = sum(f"{prefix}.{o}" in modules for o in owners)
                if best is None or hits > best[0]:
                    missing = next((o for o in owners if f"{prefix}.{o}" not in modules), "")
                    best = (hits, f"under the prefix {prefix + '.'!r}", missing)
        parts = owner.split(".")
        for k in range(1, len(parts)):
            tail = ".".join(parts[k:])
            if tail in modules:
                prefix = ".".join(parts[:k])
                hits = sum(o.removeprefix(prefix + ".") in modules for o in owners if _under(o, prefix))
                if best is None or hits > best[0]:
                    missing = next((o for o in owners if o.removeprefix(prefix + ".") not in modules), "")
                    best = (hits, f"without the prefix {prefix + '.'!r}", missing)
        if best is not None:
            break
    if best is None:
        return ""
    hits, label, missing = best
    return f" Closest fit: {label}, where {hits} of {len(owners)} names fit ({missing!r} does not)."
