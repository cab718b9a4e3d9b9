"""The rows of the ``sparse`` sweep (issue #19): functions of one 1-D float32 tensor ``x`` of
``n`` variables whose Jacobian or Hessian is sparse.

A :class:`SparseRow` names a problem and its size; :func:`make_problem` builds ``f`` (every
constant captured) and ``x`` from the row's seed. Problems:

* ``bratu`` (grid side ``N``, Jacobian, ``n = N^2``): the 2-D Bratu residual on the unit
  square's ``N x N`` interior grid with zero Dirichlet boundary, the 5-point Laplacian
  ``r = -(u_E + u_W + u_N + u_S - 4 u) / h^2 - lambda exp(u)``, ``h = 1 / (N + 1)``,
  ``lambda = 1``; the boundary by ``F.pad``, the neighbours by slices;
* ``rosenbrock`` (``n``, Hessian): the chained Rosenbrock function
  ``sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``; tridiagonal;
* ``banded`` (``n``, Hessian): ``sum_i softplus(s_i)^2`` of the windows
  ``s_i = sum_{k=0}^{4} c_k x_{i+k}`` (fixed ``c``); banded, half-bandwidth 4;
* ``energy`` (``n``, Hessian): a partially separable energy over ``E = n`` random elements
  of ``k = 4`` variables each, gathered as ``y = x[idx]`` with ``idx: (E, k)``:
  ``sum_e (|y_e|^2 - 1)^2 + sum_e cos(y_e0 - y_e1) y_e2 y_e3``;
* ``conv`` (``n``, Jacobian): a 1-D convolutional residual
  ``r = conv1d(x, w, padding=3) + tanh(x)`` with a fixed kernel ``w`` of width 7.

Every constant is drawn in float32 from the row's seed, then cast to the asked dtype, so the
float64 reference sees the values the engines get.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

JACOBIAN, HESSIAN = "Jacobian", "Hessian"
#: Per problem: what is differentiated, and how its label names it.
PROBLEMS = {
    "bratu": (JACOBIAN, "2-D Bratu residual"),
    "rosenbrock": (HESSIAN, "chained Rosenbrock"),
    "banded": (HESSIAN, "banded softplus^2 (half-bandwidth 4)"),
    "energy": (HESSIAN, "partially separable energy, E = n elements of 4 (x[idx])"),
    "conv": (JACOBIAN, "1-D conv residual (width 7) + tanh"),
}
ELEMENT_SIZE = 4
KERNEL_WIDTH = 7
BAND = 5
Problem = tuple[Callable[[Tensor], Tensor], Tensor]


@dataclass(frozen=True)
class SparseRow:
    """One problem at one size (``bratu``: the grid side; else the number of variables)."""

    problem: str
    size: int

    @property
    def kind(self) -> str:
        """``Jacobian`` or ``Hessian``."""
        return PROBLEMS[self.problem][0]

    @property
    def n(self) -> int:
        """The number of variables."""
        return self.size ** 2 if self.problem == "bratu" else self.size

    def label(self) -> str:
        size = f"{self.size}^2 grid, n = {self.n:,}" if self.problem == "bratu" else (
            f"n = {self.n:,}")
        return f"{PROBLEMS[self.problem][1]} {self.kind}, {size}"

    def seed(self) -> int:
        return 1000 * list(PROBLEMS).index(self.problem) + self.size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_problem(row: SparseRow, dtype: torch.dtype = torch.float32) -> Problem:
    """``f`` and ``x`` of ``row`` (module docstring), in ``dtype``."""
    g = torch.Generator().manual_seed(row.seed())
    return _BUILDERS[row.problem](row, g, dtype)


def _bratu(row: SparseRow, g: torch.Generator, dtype: torch.dtype) -> Problem:
    side = row.size
    inv_h2 = float((side + 1) ** 2)
    x = torch.rand(row.n, generator=g).mul_(0.5).to(dtype)

    def residual(x: Tensor) -> Tensor:
        u = F.pad(x.reshape(side, side), (1, 1, 1, 1))
        centre = u[1:-1, 1:-1]
        laplacian = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * centre
        return (-inv_h2 * laplacian - torch.exp(centre)).reshape(-1)

    return residual, x


def _rosenbrock(row: SparseRow, g: torch.Generator, dtype: torch.dtype) -> Problem:
    x = torch.randn(row.n, generator=g).to(dtype)

    def rosenbrock(x: Tensor) -> Tensor:
        return (100 * (x[1:] - x[:-1].square()).square() + (1 - x[:-1]).square()).sum()

    return rosenbrock, x


def _banded(row: SparseRow, g: torch.Generator, dtype: torch.dtype) -> Problem:
    c = torch.randn(BAND, generator=g).to(dtype)
    x = torch.randn(row.n, generator=g).to(dtype)
    width = row.n - BAND + 1

    def banded(x: Tensor) -> Tensor:
        s = sum(c[k] * x[k:k + width] for k in range(BAND))
        return F.softplus(s).square().sum()

    return banded, x


def _energy(row: SparseRow, g: torch.Generator, dtype: torch.dtype) -> Problem:
    idx = torch.stack([torch.randperm(row.n, generator=g)[:ELEMENT_SIZE]
                       for _ in range(row.n)])
    x = torch.randn(row.n, generator=g).mul_(0.5).to(dtype)

    def energy(x: Tensor) -> Tensor:
        y = x[idx]
        stretch = (y.square().sum(-1) - 1).square()
        twist = torch.cos(y[:, 0] - y[:, 1]) * y[:, 2] * y[:, 3]
        return (stretch + twist).sum()

    return energy, x


def _conv(row: SparseRow, g: torch.Generator, dtype: torch.dtype) -> Problem:
    w = torch.randn(1, 1, KERNEL_WIDTH, generator=g).to(dtype)
    x = torch.randn(row.n, generator=g).to(dtype)

    def residual(x: Tensor) -> Tensor:
        smoothed = F.conv1d(x.reshape(1, 1, -1), w, padding=KERNEL_WIDTH // 2).reshape(-1)
        return smoothed + torch.tanh(x)

    return residual, x


_BUILDERS: dict[str, Callable[[SparseRow, torch.Generator, torch.dtype], Problem]] = {
    "bratu": _bratu, "rosenbrock": _rosenbrock, "banded": _banded, "energy": _energy,
    "conv": _conv,
}
