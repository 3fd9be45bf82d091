"""One adapter per sample: a batch whose rows run different adapters of one base, PEFT's
``model(x, adapter_names=[...])``, as a context manager (the model's signature is the user's)::

    with per_sample_adapters(model, ["legal", "__base__", "medical", "legal"]):
        y = model(x)  # row i as if run alone with only adapter names[i] active

Inside the block, every LoRA wrapper of ``model`` splits its input along dim 0 by adapter (one
``index_select`` per distinct name, never a loop over rows), runs each sub-batch through its own
forward with that one adapter active (fast path included), and puts the rows back in place::

    x (N, ...) ─┬─► rows of "a"        ──► forward, only "a" active ──┐
                ├─► rows of "b"        ──► forward, only "b" active ──┼──► y (N, ...), rows in order
                └─► rows of "__base__" ──► forward, none active ──────┘

so row i is ``base(xᵢ) + Δ_{names[i]}(xᵢ)``, PEFT's ``_mixed_batch_forward``; a layer that lacks
adapter ``names[i]`` adds nothing to that row, as in PEFT. DoRA adapters are exact too (PEFT
refuses them): their scale ``m / ‖W + ΔW‖`` depends on weights only, so rows stay independent and
each sub-batch's own forward is the DoRA forward. The base layer runs once per sub-batch,
so the work is one ordinary forward plus a gather and a scatter per distinct name. A batch that
uses one name throughout is that adapter's plain forward, bit for bit.

**Which row is which sample.** A layer sees only its input, so, as in PEFT, dim 0 of every adapted
layer's input must be the batch: ``(N, T, d)`` in a transformer, ``(N, C, H, W)`` in a conv,
``(N, T)`` token ids. Every call checks that its leading size is ``len(names)`` and otherwise
refuses, naming the layer: a model that flattens tokens to ``(N·T, d)``, runs sequence-first
``(T, N, d)``, or feeds a layer one ``(1, T)`` row broadcast over the batch (GPT-2's position
embedding) is refused, not mixed up. What no check can see is a dim 0 that means something else
and happens to have size N (a mixture-of-experts expert handed exactly N routed tokens, a
sequence-first layer with T = N): such models are not supported.

Refused when the block is entered, before anything runs: a model in training mode (as PEFT),
merged adapters (their ΔW sits in W, for every row), names the model lacks (the message lists the
ones it has), adapters switched off by :func:`~lightning_lora.adapters.disable_adapters` (every
row would run the base whatever ``names`` says), a second block on the same model, and weights
adapted through a parametrization (``nn.MultiheadAttention``): one weight tensor serves the whole
batch, so it cannot differ per sample. Training mode, merges and disabling are checked again at
every layer call, for a state changed inside the block.

The routing lives on the model's own LoRA layers (an attribute each, removed on exit, also after
an exception): nothing global, so two models can each be inside a block of their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .adapters import adapter_names
from .errors import LoRAStateError
from .layers import LoRAParametrization, LoRAWrapper
from .state import require_adapted

BASE = "__base__"
"""The name of a row that runs the base model alone (PEFT's spelling)."""

_FIX = "run one adapter per batch instead (group the samples by adapter, then set_adapter(model, name))"


class _Rows:
    """The routing of one block: which rows run which adapter. Shared by the wrappers of one
    model, called by each wrapper's forward as ``per_sample(layer, x)``."""

    def __init__(self, names: list[str], paths: dict[int, str]) -> None:
        self.names = names
        self.paths = paths  # id(layer) -> module path, for messages
        distinct = dict.fromkeys(names)  # in order of first appearance
        self.rows = {n: torch.tensor([i for i, m in enumerate(names) if m == n]) for n in distinct}
        self._on: dict[torch.device, list[tuple[str, Tensor]]] = {}

    def groups(self, device: torch.device) -> list[tuple[str, Tensor]]:
        """``(name, row indices)`` per distinct name, the indices on ``device`` (moved once)."""
        if device not in self._on:
            self._on[device] = [(n, rows.to(device)) for n, rows in self.rows.items()]
        return self._on[device]

    def __call__(self, layer: LoRAWrapper, x: Tensor) -> Tensor:
        """``y[rows of a] = layer(x[rows of a]) with only adapter a active``, for every name."""
        self.check_call(layer, x)
        groups = self.groups(x.device)
        if len(groups) == 1:
            return _run_alone(layer, x, groups[0][0])
        y = None
        for name, rows in groups:
            y_rows = _run_alone(layer, x.index_select(0, rows), name)
            if y is None:
                y = y_rows.new_empty((x.shape[0], *y_rows.shape[1:]))
            y.index_copy_(0, rows, y_rows)
        return y

    def check_call(self, layer: LoRAWrapper, x: Tensor) -> None:
        path = self.paths.get(id(layer), type(layer).__name__)
        refuse_state([(path, layer)])
        n = len(self.names)
        if x.dim() == 0 or x.shape[0] != n:
            size = "a 0-d input" if x.dim() == 0 else f"an input of leading size {x.shape[0]} (shape {tuple(x.shape)})"
            raise LoRAStateError(
                f"per_sample_adapters has {n} names, one per row of the batch, but {path!r} was called with "
                f"{size}. Every adapted layer must see the batch in dim 0: pass one name per row. A model that "
                f"flattens tokens to (N·T, d), puts the sequence first, or broadcasts one (1, ...) row over the "
                f"batch before an adapted layer cannot tell its rows' samples apart: leave that layer out of "
                f"the adapter, or {_FIX}."
            )


def _run_alone(layer: LoRAWrapper, x: Tensor, name: str) -> Tensor:
    """The layer's own forward on ``x`` with only adapter ``name`` active (none for ``"__base__"``
    or a name this layer lacks): what ``set_adapter(model, name)`` runs. ``forward`` itself, not
    the module call: hooks on the layer already ran once, for the whole batch. Both attributes
    it changes are restored before it returns, also after an exception."""
    routing, active = layer.per_sample, layer.active_adapters
    layer.per_sample, layer.active_adapters = None, [name] if name in layer.lora_A else []
    try:
        return layer.forward(x)
    finally:
        layer.per_sample, layer.active_adapters = routing, active


def refuse_state(layers: list[tuple[str, LoRAWrapper]]) -> None:
    """Refuse a training, merged or disabled layer (``(path, layer)`` pairs): no per-sample
    answer would be right."""
    for path, layer in layers:
        if layer.training:
            raise LoRAStateError(
                f"per_sample_adapters is for inference, and {path!r} is in training mode (PEFT refuses "
                f"adapter_names while training too). Call model.eval() first."
            )
        if layer.merged_adapters:
            raise LoRAStateError(
                f"adapters {layer.merged_adapters} are merged into the weight of {path!r}: their ΔW would reach "
                f"every row, whatever its name. Call unmerge_lora(model) first."
            )
        if layer.adapters_disabled:
            raise LoRAStateError(
                f"adapters are disabled in {path!r} (inside disable_adapters): every row would run the base "
                f"model whatever its name. Leave that block, and give the rows that should run the base "
                f"model the name {BASE!r}."
            )


def _checked_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise LoRAStateError(
            f"per_sample_adapters needs a list with one adapter name per row of the batch, got "
            f"{type(names).__name__} {names!r}; e.g. ['a', '{BASE}', 'b']."
        )
    names = list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise LoRAStateError(f"adapter names are strings; per_sample_adapters got {bad[:3]}.")
    present = adapter_names(model)
    if BASE in present:
        raise LoRAStateError(
            f"the model has an adapter named {BASE!r}, which per_sample_adapters reads as 'the base model "
            f"alone'; rename it to use per-sample adapters."
        )
    unknown = list(dict.fromkeys(n for n in names if n not in present and n != BASE))
    if unknown:
        raise LoRAStateError(
            f"no adapter named {unknown} in the model; adapters: {present}, and {BASE!r} for the base model alone."
        )
    return names


@contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Inside the block, row ``i`` of every batch ``model`` runs goes through adapter
    ``names[i]`` only (``"__base__"``: the base model alone), as PEFT's ``adapter_names=``.

    ``names`` has one entry per row of the batch; dim 0 of every adapted layer's input must be
    that batch (checked at each layer call). Usable in a LightningModule's ``predict_step``
    (``Trainer.predict`` runs in eval mode)::

        with per_sample_adapters(self.model, batch["adapter"]):
            return self.model(batch["input_ids"]).logits

    Raises :class:`~lightning_lora.errors.LoRAStateError` in training mode, with merged or
    disabled adapters, for unknown names, for adapters applied as weight parametrizations
    (``nn.MultiheadAttention``), and for a second block on the same model; see
    :mod:`lightning_lora.mixed_batches` for the reasons. On exit (also after an exception) the
    model is as before: active adapters unchanged, nothing left on its layers.
    """
    targets = require_adapted(model, "run adapters per sample")
    names = _checked_names(model, names)
    if model.training:
        raise LoRAStateError(
            "per_sample_adapters is for inference, and the model is in training mode (PEFT refuses "
            "adapter_names while training too). Call model.eval() first."
        )
    on_weights = [t.name for t in targets if isinstance(t.layer, LoRAParametrization)]
    if on_weights:
        raise LoRAStateError(
            f"per_sample_adapters cannot give each sample its own adapter in {on_weights[0]!r}"
            f"{f' ({len(on_weights) - 1} more)' if len(on_weights) > 1 else ''}: its adapter is a parametrization "
            f"of the weight (nn.MultiheadAttention, and nn.TransformerEncoderLayer's fast path, read weights directly), and one weight serves the whole "
            f"batch. {_FIX[0].upper()}{_FIX[1:]}."
        )
    layers = {id(t.layer): (t.path, t.layer) for t in targets}  # a layer at two names once
    refuse_state(list(layers.values()))
    if any(layer.per_sample is not None for _, layer in layers.values()):
        raise LoRAStateError(
            "this model is already inside a per_sample_adapters block; blocks on one model do not nest "
            "(leave the first one, or pass the names you want to a single block)."
        )
    routing = _Rows(names, {i: path for i, (path, _) in layers.items()})
    for _, layer in layers.values():
        layer.per_sample = routing
    try:
        yield
    finally:
        for _, layer in layers.values():
            del layer.per_sample  # back to the class's None: nothing left on the layer
