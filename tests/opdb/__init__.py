"""The op database: every supported op with samples, domain, orders and tolerances.

In the spirit of PyTorch's OpInfo: ``tests/test_opdb.py`` is parametrised over
:data:`OPS` x order and compares ``hod.derivative`` against nested ``torch.func`` in
float64. Each family module (``elementwise``, ``reductions``, ...) calls :func:`add`.
``OpInfo.aten`` names the ATen ops whose rules the entry exercises; a meta-test checks
the claim against the traced graphs and that every rule in ``hod.rules.RULES`` is
claimed by some entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

D = torch.float64


@dataclass(frozen=True)
class OpInfo:
    """One supported op.

    ``fn`` takes the sample's tensors; ``samples()`` returns argument tuples (float64,
    inside the op's domain); ``argnums`` are differentiated; ``max_order`` is the highest
    order tested; orders ``>= slow_from`` are marked ``slow`` (left out of CI's subset).
    ``ref`` replaces ``fn`` in the torch.func reference where torch.func cannot
    differentiate ``fn`` itself (fused attention) or gets it wrong. ``degree``, when set,
    is the degree of ``fn`` as a polynomial in the differentiated inputs on the samples
    (piecewise, between kinks: relu's is 1, a product of 3 entries' is 3): derivatives of
    higher orders are zero, and the tests check that they are; below it they must not be.
    """

    name: str
    fn: Callable
    samples: Callable[[], list[tuple]]
    aten: tuple = ()
    argnums: int | tuple[int, ...] = 0
    max_order: int = 3
    slow_from: int = 4
    rtol: float = 1e-7
    atol: float = 1e-7
    family: str = ""
    ref: Callable | None = None
    degree: int | None = None
    notes: str = field(default="", compare=False)


    def vanishes_at(self, order: int) -> bool:
        """Whether the derivatives of ``order`` are zero on every sample."""
        return self.degree is not None and order > self.degree


OPS: list[OpInfo] = []


def add(*infos: OpInfo) -> None:
    """Add entries to the database (names must be unique)."""
    names = {info.name for info in OPS}
    for info in infos:
        if info.name in names:
            raise ValueError(f"duplicate op database entry {info.name!r}")
        names.add(info.name)
        OPS.append(info)


def rand(*shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """A float64 tensor uniform in ``[low, high)``."""
    return torch.rand(*shape, dtype=D) * (high - low) + low


def _load_families() -> None:
    from . import (  # noqa: F401 - importing a family adds its entries
        core,
        elementwise,
        linalg,
        nn,
        reductions,
        shape,
    )


_load_families()
