"""PEFT's per-weight rank and alpha (``rank_pattern``, ``alpha_pattern``), matched in bounded time.

PEFT reads each key as a regular expression: the first key for which
``re.match(rf"(.*\\.)?({key})$", name)`` holds gives weight ``name`` its value, i.e. the key
matches the whole name or a part of it that starts after a dot. Keys come from files, and a
backtracking matcher takes exponential time on keys such as ``(a+)+$`` (13.5 s on a 28-character
name, doubling with each character). So a key is parsed before it is compiled, and accepted only
within a grammar whose matching cost is bounded:

* atoms: a literal character, ``.``, an escape (``\\d``, ``\\w``, ``\\s``, ``\\.``, ...), a class
  ``[...]``; anchors ``^`` and ``$``;
* quantifiers ``* + ? {m} {m,} {m,n}`` (lazy ``?`` allowed) on an atom only;
* groups ``(...)`` and ``(?:...)`` with alternatives ``|``, never repeated (a trailing ``?`` is
  allowed: optional, not repeated). No look-arounds, back-references or other extensions.

Without repeated groups, the number of ways a backtracking matcher can try is at most the product
of the branching of each quantifier (``n + 1`` for an unbounded one on an ``n``-character name),
summed over alternatives; :func:`match_cost` computes it, and a match whose cost is over
:data:`MAX_COST` is refused instead of run. Real keys (``q_proj``, ``layers\\.0\\..*``,
``^model\\.(q|v)_proj``) cost a few hundred.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import AdapterFileError

MAX_KEY_LENGTH = 256
MAX_COST = 200_000
"""Ways a match may try, summed over the name's dotted suffixes: tens of milliseconds at most."""

_SPECIAL = set(".^$*+?{}[]\\|()")
_ESCAPABLE = set("dDwWsS") | _SPECIAL | set("-_/:")


class PatternKeyError(ValueError):
    """A key outside the bounded grammar; the message says what was found."""


@dataclass
class _Node:
    kind: str  # "atom", "anchor", "group", "seq", "alt"
    lo: int = 1
    hi: int | None = 1
    children: list[_Node] = field(default_factory=list)


def check_pattern_key(key: Any) -> None:
    """Raise :class:`PatternKeyError` unless ``key`` is a string in the bounded grammar."""
    _parsed(key)


def match_cost(key: str, name: str) -> int:
    """An upper bound on the ways matching ``key`` against ``name`` can try (see the module doc)."""
    return _cost(_parsed(key), len(name)) * (name.count(".") + 1)


def key_matches(key: str, name: str) -> bool:
    """PEFT's rule: ``key`` matches ``name`` or a dotted suffix of it (``...\\.<suffix>``)."""
    compiled = _compiled(key)
    starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
    return any(compiled.fullmatch(name, start) for start in starts)


def pattern_value(pattern: Mapping[str, Any], name: str, default: Any, where: str = "rank_pattern") -> Any:
    """Per-weight rank/alpha: an exact name (our files), else the first key matching by PEFT's
    rule. A key too costly to match against ``name`` is an :class:`AdapterFileError`."""
    if name in pattern:
        return pattern[name]
    for key, value in pattern.items():
        try:
            cost = match_cost(key, name)
        except PatternKeyError as err:
            raise AdapterFileError(f"{where} key {key!r}: {err}") from None
        if cost > MAX_COST:
            raise AdapterFileError(
                f"{where} key {key!r} could take about {cost:,} steps to match {name!r} (more than {MAX_COST:,}): "
                f"a pattern with that many unbounded repeats is refused, not run. Use the module's name."
            )
        if key_matches(key, name):
            return value
    return default


@lru_cache(maxsize=1024)
def _compiled(key: str) -> re.Pattern[str]:
    _parsed(key)
    return re.compile(f"(?:{key})")


@lru_cache(maxsize=1024)
def _parsed(key: Any) -> _Node:
    if not isinstance(key, str) or not key:
        raise PatternKeyError(f"a key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise PatternKeyError(f"a key may have at most {MAX_KEY_LENGTH} characters, this one has {len(key)}")
    parser = _Parser(key)
    node = parser.alternatives()
    if parser.pos != len(key):
        raise PatternKeyError(f"unbalanced ')' at position {parser.pos}")
    return node


class _Parser:
    def __init__(self, key: str) -> None:
        self.key, self.pos = key, 0

    def peek(self) -> str:
        return self.key[self.pos] if self.pos < len(self.key) else ""

    def fail(self, what: str) -> PatternKeyError:
        return PatternKeyError(
            f"{what} at position {self.pos}; keys are module names or simple patterns (no repeated groups, "
            f"look-arounds or back-references)"
        )

    def alternatives(self) -> _Node:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else _Node("alt", children=branches)

    def sequence(self) -> _Node:
        items = []
        while self.peek() not in ("", "|", ")"):
            items.append(self.item())
        return _Node("seq", children=items)

    def item(self) -> _Node:
        char = self.peek()
        if char == "(":
            self.pos += 3 if self.key.startswith("(?:", self.pos) else 1
            if self.key.startswith("(?", self.pos - 1) and not self.key.startswith("(?:", self.pos - 1):
                raise self.fail("a group extension '(?'")
            inner = self.alternatives()
            if self.peek() != ")":
                raise self.fail("an unclosed group")
            self.pos += 1
            lo, hi = self.quantifier()
            if (lo, hi) not in ((1, 1), (0, 1)):
                raise self.fail("a repeated group")
            return _Node("group", lo, hi, [inner])
        if char in "^$":
            self.pos += 1
            return _Node("anchor")
        if char in "*+?{":
            raise self.fail(f"a quantifier {char!r} with nothing to repeat")
        if char == "[":
            self.character_class()
        elif char == "\\":
            if self.key[self.pos + 1 : self.pos + 2] not in _ESCAPABLE or self.pos + 1 >= len(self.key):
                raise self.fail(f"the escape {self.key[self.pos : self.pos + 2]!r}")
            self.pos += 2
        elif not char.isprintable():
            raise self.fail("a control character")
        else:
            self.pos += 1
        lo, hi = self.quantifier()
        return _Node("atom", lo, hi)

    def character_class(self) -> None:
        end = self.pos + 1
        while end < len(self.key) and self.key[end] != "]":
            if self.key[end] in "[\\" and not (self.key[end] == "\\" and self.key[end + 1 : end + 2] in _ESCAPABLE):
                raise self.fail("a class with nested brackets or an unknown escape")
            end += 2 if self.key[end] == "\\" else 1
        if end >= len(self.key) or end == self.pos + 1:
            raise self.fail("an unclosed or empty class")
        self.pos = end + 1

    def quantifier(self) -> tuple[int, int | None]:
        char = self.peek()
        bounds: tuple[int, int | None] = (1, 1)
        if char in ("*", "+", "?"):
            self.pos += 1
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{":
            m = re.compile(r"\{(\d{1,3})(,(\d{0,3}))?\}").match(self.key, self.pos)
            if m is None:
                raise self.fail("a '{' that is not a repeat count {m}, {m,} or {m,n}")
            self.pos = m.end()
            lo = int(m[1])
            hi = lo if m[2] is None else (int(m[3]) if m[3] else None)
            if hi is not None and hi < lo:
                raise self.fail("a repeat count {m,n} with n < m")
            bounds = (lo, hi)
        else:
            return bounds
        if self.peek() == "?":  # lazy: the same tries, in another order
            self.pos += 1
        if self.peek() in ("*", "+", "{") or (self.peek() == "?" and bounds != (1, 1)):
            raise self.fail("a repeat of a repeat")
        return bounds


def _cost(node: _Node, n: int) -> int:
    if node.kind == "seq":
        total = 1
        for child in node.children:
            total *= _cost(child, n)
        return total
    if node.kind == "alt":
        return sum(_cost(child, n) for child in node.children)
    if node.kind == "group":  # never repeated: optional at most
        return _cost(node.children[0], n) + (1 if node.lo == 0 else 0)
    if node.hi is None:
        return max(n - node.lo + 1, 1)
    return max(min(node.hi, n) - node.lo + 1, 1)
