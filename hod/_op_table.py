"""A table keyed by ATen op, filled by a registering decorator (rules, decompositions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict[Any, Any], kind: str) -> Callable[..., Callable[[F], F]]:
    """``register(*ops)``: a decorator storing its function under every op in ``ops``.

    Registering an op twice raises, naming ``kind`` (``"rules"``, ``"decompositions"``).
    """

    def register(*ops: Any) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            for op in ops:
                if op in table:
                    raise ValueError(f"two {kind} registered for {op}")
                table[op] = fn
            return fn

        return decorate

    return register
