"""The Hydra schema of the ``lora`` node, generated from the code so that no YAML restates it.

``LoRACallbackConf`` is a dataclass built from ``LoRACallback.__init__``'s keyword parameters:
``LoRAConfig``'s fields with their types and defaults, then the callback's own options (types
from the signature; a factory such as ``optimizer`` is ``Any``, a Hydra ``_partial_`` node), under
``_target_: lightning_lora.LoRACallback``. :func:`register_configs` stores it in Hydra's
``ConfigStore`` as ``lora/schema``, so a config file states only what it changes::

    # conf/lora/default.yaml
    defaults:
      - schema
      - _self_
    trainable_modules: [head]

Composition then checks every key and type: ``lora.rank=4`` fails (*Key 'rank' not in
'LoRACallbackConf'*), ``lora.r=abc`` fails naming ``lora.r``, and every option composes
(``lora.full_checkpoints=true``). Values are validated when the callback is built.

Registration must come before composition: ``lightning_lora.train`` registers on import (so do
tests that compose its tree); an app of your own calls :func:`register_configs` before
``@hydra.main`` runs or ``compose`` is called.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .callback import TARGET, LoRACallback
from .config import LoRAConfig

GROUP, NAME = "lora", "schema"
_CHECKED = (bool, int, float, str)  # what OmegaConf checks and converts on assignment


def node_type(annotation: Any) -> Any:
    """``annotation`` where OmegaConf can check it (a scalar, an optional scalar, a list of
    scalars, a dict of scalars), else ``Any``: a factory or a union like ``str | list[str]`` is checked when the
    callback is built instead."""
    args = typing.get_args(annotation)
    if annotation in _CHECKED or (typing.get_origin(annotation) is list and args and args[0] in _CHECKED):
        return annotation
    if typing.get_origin(annotation) is dict and args and args[0] is str and args[1] in _CHECKED:
        return annotation  # a typed dict takes new keys (lora.rank_pattern={v_proj:2}), values checked
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional and len(args) == 2 and node_type(next(a for a in args if a is not type(None))) is not Any:
        return annotation
    return Any


def schema_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` of ``_target_`` and of every keyword parameter of LoRACallback."""
    lora_types, lora_fields = typing.get_type_hints(LoRAConfig), {f.name: f for f in dataclasses.fields(LoRAConfig)}
    option_types = typing.get_type_hints(LoRACallback.__init__)
    spec: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=TARGET))]
    for parameter in inspect.signature(LoRACallback.__init__).parameters.values():
        if parameter.kind is not parameter.KEYWORD_ONLY:
            continue  # config= (a whole LoRAConfig, which the flat fields replace here) and **unknown
        if parameter.name in lora_fields:
            field = lora_fields[parameter.name]
            default = dataclasses.field(default=field.default, default_factory=field.default_factory)
            spec.append((parameter.name, node_type(lora_types[parameter.name]), default))
        else:
            spec.append((parameter.name, node_type(option_types[parameter.name]), parameter.default))
    return spec


LoRACallbackConf = dataclasses.make_dataclass("LoRACallbackConf", schema_fields())
LoRACallbackConf.__module__ = __name__  # make_dataclass(module=...) needs Python 3.12


def register_configs() -> None:
    """Store the schema as ``lora/schema`` in Hydra's ConfigStore (again is harmless). Its dict
    fields (``rank_pattern``, ``alpha_pattern``) take new keys: ``lora.rank_pattern={v_proj:2}``
    adds one, where the struct flag of the rest of the node would refuse it (values still typed)."""
    node = OmegaConf.structured(LoRACallbackConf)
    for name, kind, _ in schema_fields():
        if typing.get_origin(kind) is dict:
            OmegaConf.set_struct(node[name], False)
    ConfigStore.instance().store(group=GROUP, name=NAME, node=node, provider="lightning_lora")
