"""An adapter directory read and checked, before any model is touched: :class:`AdapterFile`.

Reading never trusts a file (:mod:`lightning_lora.untrusted`): both files come from one version
of the directory, each read once (:func:`~lightning_lora.atomic.read_files`); tensors come from
safetensors only (no pickle); every config field and metadata field is type-checked; only LoRA
tensors and tensors of the declared ``modules_to_save`` are accepted; the two files are checked
against each other (ranks, the fields that set the math). PEFT's MHA layout is turned into ours
here (:mod:`lightning_lora.peft_mha`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from .atomic import interrupted_save_hint, read_files
from .config import ADAPTER_DTYPES, INITS, MHA_PROJECTIONS, AdapterSpec, valid_init
from .delta import Update, delta_weight, dora_merged_block, merged_block
from .errors import AdapterFileError
from .names import FILE_PREFIX, parse_file_key, peft_mha_owner
from .patterns import pattern_value
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MATH_DEFAULTS, MATH_KEYS, check_peft_config
from .peft_mha import METADATA_FIELD, from_peft
from .untrusted import MAX_CONFIG_BYTES, parse_json, parse_safetensors, printable

METADATA_KEY = "lightning_lora"
"""The key of our fields in the safetensors metadata (PEFT ignores it)."""


MAX_KEY_LENGTH = 1000


def read_adapter_files(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """``(config, tensors, extras)`` of adapter directory ``path``, both files from one version
    of it (each read once, as bytes, then parsed: a save in between cannot tear them apart).
    The config is checked to be a LoRA adapter whose math we implement (unknown fields at their
    defaults are ignored with a warning; others, and DoRA and the like, are refused), every
    field has its type, and the tensors come from safetensors (never a pickle)."""
    return _read(Path(path))[:3]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any], dict[str, int]]:
    try:
        found = read_files(path, (ADAPTER_CONFIG, ADAPTER_WEIGHTS), {ADAPTER_CONFIG: MAX_CONFIG_BYTES})
    except (FileNotFoundError, NotADirectoryError) as err:
        what = "does not exist" if isinstance(err, FileNotFoundError) else "is not a directory"
        raise AdapterFileError(
            f"adapter directory {str(path)!r} {what}; an adapter directory holds {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS}, as written by save_adapter or PEFT's save_pretrained.{interrupted_save_hint(path)}"
        ) from None
    if found[ADAPTER_CONFIG] is None:
        raise AdapterFileError(
            f"adapter directory {str(path)!r} has no {ADAPTER_CONFIG}; an adapter directory holds {ADAPTER_CONFIG} "
            f"and {ADAPTER_WEIGHTS}, as written by save_adapter or PEFT's save_pretrained."
        )
    config = check_peft_config(parse_json(found[ADAPTER_CONFIG], str(path / ADAPTER_CONFIG)), path / ADAPTER_CONFIG)
    file = path / ADAPTER_WEIGHTS
    if found[ADAPTER_WEIGHTS] is None:
        raise AdapterFileError(f"{file} is missing; the adapter directory is incomplete.")
    tensors, metadata = parse_safetensors(found[ADAPTER_WEIGHTS], str(file))
    extras = parse_json(metadata.get(METADATA_KEY, "{}").encode(), f"{file}: its {METADATA_KEY!r} metadata")
    check_extras(extras, file)
    return config, tensors, extras, {name: len(data) for name, data in found.items() if data is not None}


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of directory ``path``, checked (see :func:`read_adapter_files`)."""
    return read_adapter_files(path)[0]


def read_adapter_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of ``adapter_model.safetensors`` (never a pickle) and our metadata extras."""
    _, tensors, extras = read_adapter_files(path)
    return tensors, extras


# What our metadata may hold; a file from PEFT or another writer has none of it.
_EXTRAS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "version": (lambda v: isinstance(v, str), "a string"),
    "adapter_name": (lambda v: isinstance(v, str), "a string"),
    "init": (valid_init, f"one of {list(INITS)}"),
    "mha_projections": (lambda v: isinstance(v, list) and set(v) <= set(MHA_PROJECTIONS) and v, "a subset of q, k, v"),
    "adapter_dtype": (lambda v: v is None or v in ADAPTER_DTYPES, f"null or one of {list(ADAPTER_DTYPES)}"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "freeze_a": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of weight names"),
    "root": (lambda v: v is None or isinstance(v, str), "null or a module name"),
    METADATA_FIELD: (lambda v: isinstance(v, dict), "an object"),
    "merged_into_base": (
        lambda v: (
            isinstance(v, dict) and all(isinstance(d, list) and all(isinstance(x, str) for x in d) for d in v.values())
        ),
        "an object mapping weight names to lists of digests",
    ),
}


def check_extras(extras: Any, file: Path) -> None:
    """Our safetensors metadata has the shape we write, field by field."""
    if not isinstance(extras, dict):
        raise AdapterFileError(f"{file}: its {METADATA_KEY!r} metadata must be a JSON object, found {extras!r}.")
    for key, (ok, expected) in _EXTRAS.items():
        if key in extras and not ok(extras[key]):
            raise AdapterFileError(
                f"{file}: its {METADATA_KEY!r} metadata field {key!r} must be {expected}, found {extras[key]!r}. "
                f"The file was edited or damaged; save the adapter again."
            )


def _declared(key: str, modules: list[str]) -> bool:
    """Whether state-dict key ``key`` lies inside one of ``modules`` (names or dotted suffixes of
    module names, as PEFT's ``modules_to_save``)."""
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(p == m or p.endswith("." + m) for p in prefixes for m in modules)


@dataclass
class AdapterFile:
    """An adapter directory, read and checked on its own, before any model is touched.

    ``pairs`` maps each adapted weight's name to ``(A, B)`` as stored (``(r, d_in)`` and
    ``(d_out, r)``; a conv's as kernels: :meth:`update` gives the matrices); ``trainable`` holds
    the trainable modules' tensors under the model's state-dict keys; ``embedding`` names the
    weights keyed as PEFT keys an ``nn.Embedding`` (``lora_embedding_A``); ``magnitudes`` holds a
    DoRA adapter's ``m: (d_out,)`` per weight (empty without ``use_dora``).
    """

    path: Path
    config: dict[str, Any]
    pairs: dict[str, tuple[Tensor, Tensor]]
    trainable: dict[str, Tensor]
    extras: dict[str, Any]
    embedding: frozenset[str] = frozenset()
    alphas: dict[str, float] = field(default_factory=dict)
    """``lora_alpha`` of weights read from PEFT's MHA layout (their names are not in the config)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Bytes of each file as read."""
    magnitudes: dict[str, Tensor] = field(default_factory=dict)
    """DoRA's ``lora_magnitude_vector`` of each weight, if the file sets ``use_dora``."""

    def rank(self, name: str) -> int:
        return int(self.pairs[name][0].shape[0])

    def alpha(self, name: str) -> float:
        """``lora_alpha`` of weight ``name`` (its ``alpha_pattern`` entry, if any)."""
        if name in self.alphas:
            return self.alphas[name]
        where = f"{self.path / ADAPTER_CONFIG}: alpha_pattern"
        return float(pattern_value(self.config.get("alpha_pattern") or {}, name, self.config["lora_alpha"], where))

    def spec(self, name: str, base: AdapterSpec | None = None) -> AdapterSpec:
        """The hyper-parameters of weight ``name``: rank and alpha from the file, the rest from
        ``base`` (the config the adapter is injected with)."""
        base = base or AdapterSpec(r=self.rank(name), alpha=self.alpha(name))
        use_rslora = self.config.get("use_rslora") is True  # type-checked: a JSON boolean
        return replace(base, r=self.rank(name), alpha=self.alpha(name), use_rslora=use_rslora)

    def scaling(self, name: str) -> float:
        """The factor on ``B A`` of weight ``name`` (:func:`~lightning_lora.config.lora_scale`)."""
        return self.spec(name).scale

    def update(self, name: str) -> Update:
        """``(A (r, d_in), B (d_out, r), scale)`` of weight ``name``: matrices, whatever the layer."""
        A, B = self.pairs[name]
        return A.flatten(1), B.flatten(1), self.scaling(name)

    def delta_weight(self, name: str) -> Tensor:
        """``ΔW = scale · B A`` of shape ``(d_out, d_in)``, in float32."""
        return delta_weight(*self.update(name))

    def merged(self, name: str, block: Tensor) -> Tensor:
        """Weight ``name``'s update merged into the base's ``(d_out, d_in)`` ``block``, in float32
        (a new tensor): ``W + ΔW``, or DoRA's ``(m / ‖W + ΔW‖) ⊙ (W + ΔW)``, as a model merges it."""
        if name in self.magnitudes:
            return dora_merged_block(block, self.update(name), self.magnitudes[name])[0]
        return merged_block(block, [self.update(name)])

    def delta_norm(self, name: str) -> float:
        """``‖ΔW‖_F`` without forming ΔW: ``‖s·BA‖²_F = s² · Σ (BᵀB) ⊙ (AAᵀ)``, two ``r × r``
        products in float64."""
        A, B, scale = self.update(name)
        A, B = A.double(), B.double()
        return abs(scale) * float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0).sqrt())


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read directory ``path`` and check that its two files agree with each other: every weight
    has an ``A`` and a ``B`` whose ranks match each other and the config."""
    path = Path(path)
    config, tensors, extras, sizes = _read(path)
    file = path / ADAPTER_WEIGHTS
    saved = extras.get("config")
    if saved is not None:
        differ = [
            k
            for k in MATH_KEYS
            if saved.get(k, MATH_DEFAULTS.get(k)) != config.get(k, saved.get(k, MATH_DEFAULTS.get(k)))
        ]
        if differ:
            k = differ[0]
            raise AdapterFileError(
                f"{Path(path) / ADAPTER_CONFIG} says {k}={config.get(k)!r} but {file} was saved "
                f"with {k}={saved.get(k)!r}: the two files come from different saves (an interrupted "
                f"save, or files copied from two adapters). Save the adapter again."
            )
    halves: dict[str, dict[str, Tensor]] = {}
    magnitudes: dict[str, Tensor] = {}
    trainable: dict[str, Tensor] = {}
    embedding: set[str] = set()
    declared = list(config.get("modules_to_save") or [])
    for key, tensor in tensors.items():
        if len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise AdapterFileError(f"{file} holds a tensor named {printable(key[:80])!r}..., not a module's name.")
        parsed = parse_file_key(key)
        if parsed and parsed.part == "m":
            magnitudes[parsed.name] = tensor
        elif parsed:
            halves.setdefault(parsed.name, {})[f"lora_{parsed.part}"] = tensor
            if parsed.embedding:
                embedding.add(parsed.name)
        elif re.search(r"\.lora_\w+", key):
            raise AdapterFileError(
                f"{file} holds {key!r}, a LoRA tensor of a kind lightning-lora does not implement "
                f"(it loads lora_A/lora_B and lora_embedding_A/lora_embedding_B pairs, and DoRA's "
                f"lora_magnitude_vector)."
            )
        elif key.startswith(FILE_PREFIX) and _declared(key.removeprefix(FILE_PREFIX), declared):
            trainable[key.removeprefix(FILE_PREFIX)] = tensor
        else:
            hint = (
                " PEFT writes the base weights of adapted embedding layers with save_embedding_layers=True: "
                "save with save_embedding_layers=False unless the vocabulary was resized."
                if key.endswith(".base_layer.weight")
                else ""
            )
            raise AdapterFileError(
                f"{file} holds {key!r}, which is neither a LoRA tensor nor inside a module its config "
                f"declares in modules_to_save ({declared}): an adapter file may not replace other weights of the "
                f"model. Refused.{hint}"
            )
    if not halves:
        raise AdapterFileError(f"{file} holds no lora_A/lora_B tensors; it is not a LoRA adapter.")
    pairs = {}

    def rank_of(name: str) -> int:
        return int(
            pattern_value(config.get("rank_pattern") or {}, name, config["r"], f"{path / ADAPTER_CONFIG}: rank_pattern")
        )

    def alpha_of(name: str) -> float:
        where = f"{path / ADAPTER_CONFIG}: alpha_pattern"
        return float(pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"], where))

    mha = {peft_mha_owner(n) for n in halves} - {None}
    for name, ab in halves.items():
        if set(ab) != {"lora_A", "lora_B"}:
            lacking = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise AdapterFileError(
                f"{file} has {name}'s {set(ab).pop()} but not its {lacking}; the file is incomplete."
            )
        A, B = ab["lora_A"], ab["lora_B"]
        if name in mha or peft_mha_owner(name) is not None:
            pairs[name] = (A, B)  # PEFT's MHA layout: checked as a whole by from_peft
            continue
        expected = rank_of(name)
        if A.dim() < 2 or B.dim() != A.dim() or A.shape[0] != expected or B.shape[1] != expected:
            raise AdapterFileError(
                f"{Path(path) / ADAPTER_CONFIG} says r={expected} for {name!r}, but {file} has "
                f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} (expected ({expected}, d_in) and "
                f"(d_out, {expected}), or a conv's ({expected}, in, *kernel) and (d_out, {expected}, 1, ...)); "
                f"the files do not belong together."
            )
        if any(n != 1 for n in B.shape[2:]):
            raise AdapterFileError(
                f"{file} has lora_B {tuple(B.shape)} for {name!r}: a conv adapter's B must be a 1×1 kernel "
                f"(PEFT's layout); lightning-lora does not implement other kernels for B."
            )
        pairs[name] = (A, B)
    _check_magnitudes(magnitudes, pairs, config.get("use_dora") is True, mha, file)
    layouts = extras.get(METADATA_FIELD) if "version" in extras else None  # None: a file PEFT wrote
    pairs, alphas = from_peft(pairs, alpha_of, rank_of, layouts, file, config.get("peft_version"))
    return AdapterFile(path, config, pairs, trainable, extras, frozenset(embedding), alphas, sizes, magnitudes)


def _check_magnitudes(
    magnitudes: dict[str, Tensor], pairs: dict[str, tuple[Tensor, Tensor]], dora: bool, mha: set[str], file: Path
) -> None:
    """A DoRA file (``use_dora: true``) has one magnitude ``(d_out,)`` per weight, and only then."""
    if not dora:
        if magnitudes:
            raise AdapterFileError(
                f"{file} holds DoRA magnitudes ({next(iter(magnitudes))}.lora_magnitude_vector) but its "
                f"{ADAPTER_CONFIG} does not set use_dora: true; the files do not belong together."
            )
        return
    if mha:
        raise AdapterFileError(
            f"{file} is a DoRA adapter of nn.MultiheadAttention {sorted(mha)[0]!r}; lightning-lora implements DoRA "
            f"for nn.Linear and transformers' Conv1D only (PEFT refuses DoRA on nn.MultiheadAttention too)."
        )
    for name, (_, B) in pairs.items():
        m = magnitudes.get(name)
        if m is None:
            raise AdapterFileError(
                f"{file} sets use_dora: true but has no lora_magnitude_vector for {name!r}; the file is incomplete."
            )
        if tuple(m.shape) != (B.shape[0],):
            raise AdapterFileError(
                f"{file} has lora_magnitude_vector {tuple(m.shape)} for {name!r}, whose lora_B {tuple(B.shape)} "
                f"needs ({B.shape[0]},); the file is damaged."
            )
    extra = sorted(set(magnitudes) - set(pairs))
    if extra:
        raise AdapterFileError(f"{file} has a lora_magnitude_vector for {extra[0]!r} but no lora_A/lora_B for it.")
