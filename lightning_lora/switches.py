"""Process-wide switches of the fast path (which path runs, input sharing, Triton kernels): one
validated value each, and a ``with`` form that restores the previous value however the block
ends. A switch is a module-level object, so the hot path reads ``switch.value`` and nothing
else."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Switch(Generic[T]):
    """``name`` is how errors call it; ``choices`` (if given) are the values it accepts;
    ``convert`` normalises a value before the check (``bool`` for an on/off switch)."""

    def __init__(self, name: str, default: T, choices: tuple[T, ...] | None = None, convert: Callable | None = None):
        self.name, self.choices, self.convert = name, choices, convert
        self.value: T = default

    def set(self, value: T) -> None:
        if self.convert is not None:
            value = self.convert(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        self.value = value

    @contextmanager
    def using(self, value: T) -> Iterator[None]:
        before = self.value
        self.set(value)
        try:
            yield
        finally:
            self.value = before
