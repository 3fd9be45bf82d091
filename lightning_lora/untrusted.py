"""Reading bytes nobody vouches for: JSON and safetensors from files, and text for a terminal.

A file is data, never code or commands. JSON is parsed with caps (size, nesting depth), without
the non-standard ``NaN``/``Infinity`` constants and without duplicate keys (where two readers
could disagree on which one counts). Safetensors come from bytes already read, never by path
(a second open could see another file). :func:`printable` makes any text safe to print:
control characters, terminal escape sequences and bidirectional overrides become visible
``\\x1b``-style escapes.
"""

from __future__ import annotations

import json
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from .errors import AdapterFileError

MAX_CONFIG_BYTES = 16 * 2**20
"""An ``adapter_config.json`` that lists every module of a 70B model is under 100 kB."""
MAX_DEPTH = 16
"""JSON nesting in an adapter config is at most 3 deep (``rank_pattern`` → key → value)."""
MAX_HEADER_BYTES = 100 * 2**20
"""safetensors' own limit on the JSON header of a file."""


def parse_json(data: bytes, where: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON value in ``data`` (the contents of ``where``), or an :class:`AdapterFileError`."""
    if len(data) > limit:
        raise AdapterFileError(f"{where} is {len(data):,} bytes, more than the {limit:,} it can need.")
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise AdapterFileError(f"{where} is not valid JSON ({err}); the file is corrupt.") from None
    except RecursionError:
        raise AdapterFileError(f"{where} is nested too deeply to be an adapter's JSON; refused.") from None
    if _depth(value) > MAX_DEPTH:
        raise AdapterFileError(f"{where} nests more than {MAX_DEPTH} levels deep; no adapter's JSON does. Refused.")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the key {twice!r} appears twice in one object")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (the value may be as deep as json's own recursion allows)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_safetensors(data: bytes, where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the ``__metadata__`` of a safetensors file given as bytes."""
    if len(data) < 8:
        raise AdapterFileError(f"{where} is not a readable safetensors file ({len(data)} bytes); it may be truncated.")
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise AdapterFileError(
            f"{where} is not a readable safetensors file (its header claims {size:,} bytes); it may be truncated."
        )
    try:
        tensors = dict(sorted(load_safetensors_bytes(data).items()))  # by name, as safe_open lists them
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{where} is not a readable safetensors file ({err}); it may be truncated.") from None
    header = parse_json(data[8 : 8 + size], f"{where} (its header)", MAX_HEADER_BYTES)
    metadata = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{where}: its __metadata__ must map names to strings.")
    return tensors, metadata


def printable(text: object, keep_newlines: bool = False) -> str:
    """``str(text)`` with every non-printable character (ESC, other C0/C1 controls, bidi
    overrides, ...) written as a visible escape, so a name from a file cannot drive the terminal."""
    out = []
    for char in str(text):
        if char.isprintable() or (keep_newlines and char == "\n"):
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)
