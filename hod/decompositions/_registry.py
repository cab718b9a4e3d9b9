"""Registration of hod's own decompositions (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HOD_DECOMPOSITIONS: dict[Any, Callable] = {}


def register_decomposition(*ops: Any) -> Callable[[Callable], Callable]:
    """Decorator: trace every op in ``ops`` as the decorated Python function."""

    def decorate(fn: Callable) -> Callable:
        for op in ops:
            if op in HOD_DECOMPOSITIONS:
                raise ValueError(f"two decompositions registered for {op}")
            HOD_DECOMPOSITIONS[op] = fn
        return fn

    return decorate
