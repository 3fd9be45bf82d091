"""LoRA's hyper-parameters: one dataclass, validated when it is built.

The same class is a plain Python config (``LoRAConfig(r=4)``), an OmegaConf structured config
(``OmegaConf.structured(LoRAConfig)``) and the schema behind the callback's flat keyword
arguments, so a typo fails at construction with a message that names the field and the fix,
long before a model is touched.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import AdapterFileError, LoRAConfigError
from .patterns import PatternKeyError, check_pattern_key, pattern_value

ALL_LINEAR = "all-linear"
INITS = ("zeros_b", "gaussian", "pissa", "pissa_niter_<K>", "olora")
MHA_PROJECTIONS = ("q", "k", "v")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on ``B A``: ``alpha / r`` (Hu et al. 2021, §4.1), or ``alpha / sqrt(r)`` with
    rank-stabilised LoRA (Kalajdzievski 2023). The one place this formula is written: layers,
    files and reports keep ``alpha`` and ``r`` and call this, so nothing inverts it."""
    return alpha / (math.sqrt(r) if use_rslora else r)


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's hyper-parameters in one layer: what its math needs, nothing else.

    A layer keeps one per adapter name. It differs from the model-wide :class:`LoRAConfig`
    where a file gives one weight its own rank or alpha (PEFT's ``rank_pattern`` /
    ``alpha_pattern``), and for combined adapters (rank ``Σrᵢ``, ``alpha = r``: scale 1)."""

    r: int
    alpha: float
    dropout: float = 0.0
    init: str = "zeros_b"
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scale(self) -> float:
        """The factor on ``B A`` (:func:`lora_scale`)."""
        return lora_scale(self.alpha, self.r, self.use_rslora)


@dataclass
class LoRAConfig:
    """Which modules get an adapter, and the adapter's shape and scale.

    A frozen weight ``W`` of shape ``(d_out, d_in)`` gets ``ΔW = (alpha / r) · B A`` with
    ``A: (r, d_in)`` and ``B: (d_out, r)`` (Hu et al. 2021, §4.1).
    """

    r: int = 8
    """Rank of ``A`` and ``B``: the update has at most ``r`` independent directions. Each adapted
    ``(d_out, d_in)`` weight costs ``r · (d_in + d_out)`` trainable parameters; the paper finds
    r between 1 and 64 enough (Hu et al. 2021, §7.2)."""

    alpha: float = 16.0
    """Scale numerator: the update is multiplied by ``alpha / r`` so that changing ``r`` does not
    change the size of the update at initialisation, and the learning rate need not be re-tuned
    for every rank (§4.1)."""

    dropout: float = 0.0
    """Dropout probability on the adapter's input ``x`` (never on the frozen path). 0 skips the
    dropout kernel entirely."""

    target_modules: Any = ALL_LINEAR
    """Which modules to adapt: ``"all-linear"`` (every linear layer: ``nn.Linear``,
    transformers' ``Conv1D``, ``nn.MultiheadAttention``), a list of names or dotted suffixes
    (``["query", "value"]`` matches ``encoder.layer.0.attention.self.query``), or one string
    taken as a regular expression that must match the full module name. Conv
    (``nn.Conv1d/2d/3d``) and ``nn.Embedding`` layers are adapted only when named, as in PEFT
    (:data:`~lightning_lora.layer_types.LAYER_TYPES`)."""

    exclude_modules: list[str] = field(default_factory=list)
    """Names or dotted suffixes never adapted, even when ``target_modules`` matches them."""

    trainable_modules: list[str] = field(default_factory=list)
    """Modules trained in full, e.g. a new classification head (PEFT's ``modules_to_save``).
    They are never adapted and are saved with the adapter."""

    init: str = "zeros_b"
    """``"zeros_b"``: ``A`` Kaiming-uniform (``N(0, 1)`` for an ``nn.Embedding``, as it draws its
    own rows), ``B = 0`` so the model is unchanged at step 0 (the paper's choice). ``"gaussian"``: ``A, B ~ N(0, 0.01²)``, the textbook variant whose output
    changes at step 0. ``"pissa"``, ``"pissa_niter_<K>"`` and ``"olora"`` (PEFT's) start ``A``/``B``
    from the principal part of ``W`` and subtract it from ``W``: they change the base weights
    (:mod:`lightning_lora.base_init`)."""

    mha_projections: list[str] = field(default_factory=lambda: list(MHA_PROJECTIONS))
    """Which of q, k, v inside an adapted ``nn.MultiheadAttention`` get their own ``A``/``B``.
    Its ``out_proj`` is adapted too, unless ``exclude_modules`` names it."""

    use_rslora: bool = False
    """Scale by ``alpha / sqrt(r)`` instead of ``alpha / r`` (rank-stabilised LoRA, Kalajdzievski
    2023), so that high ranks keep learning at the same learning rate."""

    adapter_dtype: str | None = None
    """dtype of ``A`` and ``B``. ``None`` follows the base weight (bf16 base, bf16 adapters: the
    fast choice); ``"float32"`` keeps fp32 adapters on a low-precision base."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    r"""Per-weight ranks (PEFT's ``rank_pattern``): ``{key: r}``; the others get ``r``. A key is an
    adapted weight's exact name (as tables and files name it), else matched as PEFT matches it: a
    regular expression that must match the module's name or a dotted suffix of it (``v_proj``,
    ``layers\.0\..*``); the first key that matches wins. Keys are accepted only within a
    grammar whose matching time is bounded (:mod:`lightning_lora.patterns`)."""

    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-weight ``alpha`` (PEFT's ``alpha_pattern``), matched as ``rank_pattern``."""

    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024): each adapted weight also trains a magnitude
    ``m`` of shape ``(d_out,)``, initialised to the row norms ``‖W + s·B A‖``, and computes with
    ``W' = (m / ‖W + s·B A‖) ⊙ (W + s·B A)``, the norm taken as a constant (no gradient, the
    paper's §4.3): the direction is learned by ``A``/``B``, the size of each output feature by
    ``m``. PEFT's ``use_dora``, with the same math and files. ``nn.Linear`` and transformers'
    ``Conv1D`` only, on the reference path (not the fused one); refused by name elsewhere."""

    freeze_a: bool = False
    """Keep ``A`` at its initial value and train ``B`` only (LoRA-FA, Zhang et al. 2023,
    arXiv 2308.03303). Half the trainable parameters, and less activation memory: ``dA`` is the
    only gradient that needs an adapted layer's input, so backward keeps ``x Aᵀ`` (``r`` columns)
    instead of ``x``. ``A`` is still saved with ``B``, so the files are PEFT's as usual. Costs
    accuracy at a given rank (measured in ``experiments/variants/``)."""

    def __post_init__(self) -> None:
        self.r = _positive_int("r", self.r, "the rank of A and B, e.g. r=8")
        self.alpha = _positive_number("alpha", self.alpha, "the scale numerator, e.g. alpha=16")
        self.dropout = _probability("dropout", self.dropout)
        self.target_modules = _targets(self.target_modules)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules)
        self.trainable_modules = _names("trainable_modules", self.trainable_modules)
        self.init = _init(self.init)
        self.mha_projections = _projections(self.mha_projections)
        for flag in ("use_rslora", "use_dora", "freeze_a"):
            if not isinstance(getattr(self, flag), bool):
                raise LoRAConfigError(f"LoRAConfig.{flag} must be true or false, got {getattr(self, flag)!r}.")
        if self.adapter_dtype is not None:
            self.adapter_dtype = _choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        self.rank_pattern = _pattern(
            "rank_pattern", self.rank_pattern, lambda v: _positive_int("rank_pattern", v, "a rank")
        )
        self.alpha_pattern = _pattern(
            "alpha_pattern", self.alpha_pattern, lambda v: _positive_number("alpha_pattern", v, "an alpha")
        )

    @property
    def scaling(self) -> float:
        """The factor on ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    @property
    def spec(self) -> AdapterSpec:
        """The per-layer hyper-parameters this config gives a weight no pattern names."""
        return AdapterSpec(self.r, self.alpha, self.dropout, self.init, self.use_rslora, self.use_dora)

    def spec_for(self, weight: str, module: str | None = None) -> AdapterSpec:
        """The hyper-parameters of adapted weight ``weight`` (of module ``module``, whose name
        patterns match; default: ``weight``): ``r`` and ``alpha`` from the patterns, if one names it."""
        r = _lookup(self.rank_pattern, "rank_pattern", weight, module, self.r)
        alpha = _lookup(self.alpha_pattern, "alpha_pattern", weight, module, self.alpha)
        return AdapterSpec(int(r), float(alpha), self.dropout, self.init, self.use_rslora, self.use_dora)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists, not tuples), e.g. for loggers and adapter files."""
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def build(cls, config: LoRAConfig | Mapping[str, Any] | None = None, **overrides: Any) -> LoRAConfig:
        """A config from an instance, a mapping (a Hydra/OmegaConf node too) and/or keyword
        overrides, refusing unknown keys by name so a misspelled field never passes silently."""
        if isinstance(config, LoRAConfig):
            values = config.to_dict()
        elif config is None:
            values = {}
        elif isinstance(config, Mapping):
            values = {str(k): v for k, v in config.items()}
        else:
            raise LoRAConfigError(
                f"config must be a LoRAConfig or a mapping of its fields, got {type(config).__name__}."
            )
        values.update(overrides)
        values.pop("_target_", None)
        unknown = [k for k in values if k not in cls.field_names()]
        if unknown:
            raise LoRAConfigError(_unknown_fields_message(unknown, cls.field_names()))
        return cls(**values)


# What PEFT users type out of habit, and the field that means it here.
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "modules_to_save": "trainable_modules",
    "init_lora_weights": "init",
    "targets": "target_modules",
}


def _unknown_fields_message(unknown: list[str], known: list[str]) -> str:
    parts = []
    for key in unknown:
        close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        parts.append(f"'{key}'{hint}")
    return f"LoRAConfig has no field {', '.join(parts)}. Its fields are: {', '.join(known)}."


def _positive_int(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoRAConfigError(
            f"LoRAConfig.{name} must be a positive int ({what}), got {value!r} ({type(value).__name__})."
        )
    if value <= 0:
        raise LoRAConfigError(f"LoRAConfig.{name} must be a positive int ({what}), got {value}.")
    return value


def _positive_number(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoRAConfigError(
            f"LoRAConfig.{name} must be a positive number ({what}), got {value!r} ({type(value).__name__})."
        )
    if not value > 0 or value == float("inf"):
        raise LoRAConfigError(f"LoRAConfig.{name} must be a positive number ({what}), got {value}.")
    return float(value)


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise LoRAConfigError(
            f"LoRAConfig.{name} must be a probability in [0, 1), got {value!r}; use 0.0 for no dropout or e.g. 0.05."
        )
    return float(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise LoRAConfigError(
            f"LoRAConfig.{name}={value!r} is not supported; choose one of {', '.join(repr(a) for a in allowed)}.{hint}"
        )
    return value


def valid_init(value: Any) -> bool:
    """Whether ``value`` is an ``init`` we implement (:data:`INITS`, ``<K>`` a positive integer)."""
    from .base_init import BASE_INIT_RE  # base_init imports nothing of config's

    return isinstance(value, str) and (value in ("zeros_b", "gaussian") or BASE_INIT_RE.fullmatch(value) is not None)


def _init(value: Any) -> str:
    if valid_init(value):
        return value
    hint = " (K, the subspace iterations, a positive integer: pissa_niter_4)" if str(value).startswith("pissa") else ""
    close = difflib.get_close_matches(str(value), INITS, n=1)
    did = f" Did you mean '{close[0]}'?" if close and not hint else ""
    raise LoRAConfigError(
        f"LoRAConfig.init={value!r} is not supported{hint}; choose one of 'zeros_b', 'gaussian', 'pissa', "
        f"'pissa_niter_<K>', 'olora'.{did}"
    )


def _names(name: str, value: Any) -> list[str]:
    """A list of module names; a lone string is one name. Accepts OmegaConf ListConfig."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Iterable) or isinstance(items, Mapping):
        raise LoRAConfigError(f"LoRAConfig.{name} must be a list of module names, got {value!r}.")
    items = list(items)
    bad = [i for i in items if not isinstance(i, str) or not i]
    if bad:
        raise LoRAConfigError(f"LoRAConfig.{name} must hold non-empty module names (strings), got {bad!r}.")
    return items


def _targets(value: Any) -> str | list[str]:
    if isinstance(value, str):
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as err:
                raise LoRAConfigError(
                    f"LoRAConfig.target_modules={value!r} is a string, so it is read as a regular "
                    f"expression, and it does not compile ({err}). Pass a list of names such as "
                    f"['query', 'value'], or '{ALL_LINEAR}'."
                ) from None
        return value
    names = _names("target_modules", value)
    if not names:
        raise LoRAConfigError(
            f"LoRAConfig.target_modules is empty: name the modules to adapt, e.g. "
            f"['query', 'value'], or use '{ALL_LINEAR}'."
        )
    return names


def _pattern(name: str, value: Any, check: Callable[[Any], Any]) -> dict[str, Any]:
    """A ``{key: value}`` mapping (an OmegaConf DictConfig too) whose keys parse in the bounded
    pattern grammar and whose values pass ``check``."""
    if not isinstance(value, Mapping):
        raise LoRAConfigError(
            f"LoRAConfig.{name} must map module names or patterns to values, e.g. {{v_proj: 2}}, got {value!r}."
        )
    out = {}
    for key, item in value.items():
        try:
            check_pattern_key(key)
        except PatternKeyError as err:
            raise LoRAConfigError(f"LoRAConfig.{name} key {key!r}: {err}.") from None
        out[str(key)] = check(item)
    return out


def _lookup(pattern: Mapping[str, Any], name: str, weight: str, module: str | None, default: Any) -> Any:
    if weight in pattern:
        return pattern[weight]
    try:
        return pattern_value(pattern, module or weight, default, f"LoRAConfig.{name}")
    except AdapterFileError as err:  # a key too costly for this name: a config error here
        raise LoRAConfigError(str(err)) from None


def _projections(value: Any) -> list[str]:
    names = _names("mha_projections", value)
    bad = [n for n in names if n not in MHA_PROJECTIONS]
    if bad or not names or len(set(names)) != len(names):
        raise LoRAConfigError(
            f"LoRAConfig.mha_projections must be a non-empty subset of ['q', 'k', 'v'] without repeats, got {names!r}."
        )
    return [p for p in MHA_PROJECTIONS if p in names]
