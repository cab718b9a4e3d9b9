"""Benchmark models, cases and sweeps.

The models are the MLP of the seed benchmark notebook and a tanh variant, each read out in one
of two ways (``Case.readout``):

* layers: ``relu_softmax``: ``T = X; for P in params: T = T @ P; T = softmax(T, dim=1) on the
  last layer, relu(T) before`` (the seed's); ``tanh``: ``T = tanh(T @ P)`` for every layer;
* ``"weighted"`` (what the benchmark times and checks): ``(T * R).sum()`` with ``R`` a fixed
  non-uniform (batch, width) tensor (:func:`readout_weights`), on centred inputs scaled so that
  the activations stay of order one at every depth (:func:`make_inputs`). Every block of every
  derivative is then far from zero, so a wrong derivative shows in the check;
* ``"sum"``: the seed's ``T.sum()`` on its ``torch.rand`` inputs. With the relu/softmax layers
  this is a constant (softmax rows sum to one: the output is the batch size), so every
  derivative is exactly zero, and the seed's rand weights reach 1e10 after 20 relu layers and
  saturate the softmax besides. It is kept to show that a check on it cannot fail
  (:mod:`bench.selfcheck`), not timed.

A :class:`Case` fixes one benchmark row (model, derivative order, whether parameters are
differentiated, tensor sizes, read-out); a :class:`Sweep` is an ordered list of cases that differ
in one size, as in one loop of the seed notebook. This module only needs torch, so the thoad
worker (which runs under another interpreter) can import it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

Forward = Callable[..., Tensor]


def relu_softmax_layers(X: Tensor, *params: Tensor) -> Tensor:
    """The seed notebook's layers: relu after each but the last, softmax(dim=1) on the last."""
    T = X
    for i, P in enumerate(params):
        T = T @ P
        T = torch.softmax(T, dim=1) if i == len(params) - 1 else torch.relu(T)
    return T


def relu_softmax_mlp(X: Tensor, *params: Tensor) -> Tensor:
    """The seed notebook's MLP, summed (a constant: the batch size)."""
    return relu_softmax_layers(X, *params).sum()


def tanh_layers(X: Tensor, *params: Tensor) -> Tensor:
    """tanh after every layer."""
    T = X
    for P in params:
        T = torch.tanh(T @ P)
    return T


def tanh_mlp(X: Tensor, *params: Tensor) -> Tensor:
    """An MLP with tanh after every layer, summed: smooth, with non-zero derivatives."""
    return tanh_layers(X, *params).sum()


MODELS: dict[str, Forward] = {"relu_softmax": relu_softmax_mlp, "tanh": tanh_mlp}
LAYERS: dict[str, Forward] = {"relu_softmax": relu_softmax_layers, "tanh": tanh_layers}

def readout_weights(batch: int, width: int) -> Tensor:
    """The check variant's fixed read-out weights ``R`` (batch, width), float32, in [0.2, 1.8].

    Every entry differs from its row's mean, so no derivative of ``(softmax(T) * R).sum()``
    vanishes identically; the values are a fixed formula, the same in every process.
    """
    i = torch.arange(batch, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(width, dtype=torch.float64).unsqueeze(0)
    return (1.0 + 0.8 * torch.sin(1.3 * i + 2.1 * j + 0.4)).float()


@lru_cache(maxsize=64)
def weighted_forward(model: str, batch: int, width: int, device: str = "cpu") -> Forward:
    """``model``'s layers with the read-out ``(T * R).sum()``, ``R`` on ``device`` (one function
    per size and device, cached; ``R`` is made here, not in the function, so that the traced
    function only reads it)."""
    layers = LAYERS[model]
    R = readout_weights(batch, width).to(device)

    def weighted(X: Tensor, *params: Tensor) -> Tensor:
        return (layers(X, *params) * R).sum()

    weighted.__name__ = weighted.__qualname__ = f"{model}_weighted_readout"
    return weighted


@dataclass(frozen=True)
class Case:
    """One benchmark row: which derivative of which model, at which sizes.

    ``X`` has shape ``(batch, width)`` and each of the ``depth`` parameters ``(width, width)``.
    With ``param_grad`` the derivative is taken w.r.t. ``X`` and every parameter
    (``argnums = (0, 1, ..., depth)``), otherwise w.r.t. ``X`` only (``argnums = 0``).
    ``readout`` is ``"weighted"`` for the benchmark rows, ``"sum"`` for the seed's constant
    read-out (module docstring).
    """

    model: str
    order: int
    param_grad: bool
    batch: int
    width: int
    depth: int
    readout: str = "weighted"

    def forward(self, device: str | torch.device = "cpu") -> Forward:
        """The model's forward function ``f(X, *params) -> scalar`` for inputs on ``device``."""
        if self.readout == "sum":
            return MODELS[self.model]
        return weighted_forward(self.model, self.batch, self.width, str(torch.device(device)))

    @property
    def argnums(self) -> int | tuple[int, ...]:
        """The ``argnums`` handed to hod and torch.func."""
        return tuple(range(1 + self.depth)) if self.param_grad else 0

    @property
    def n_inputs(self) -> int:
        """Number of differentiated inputs."""
        return 1 + self.depth if self.param_grad else 1

    def label(self) -> str:
        """A short human-readable description, e.g. ``tanh o3 b4 w4 d2 +params``."""
        grad = " +params" if self.param_grad else ""
        readout = "" if self.readout == "weighted" else f" {self.readout}"
        return (
            f"{self.model} o{self.order} b{self.batch} w{self.width} d{self.depth}{grad}{readout}"
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (used by the result file and the thoad worker protocol)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Case:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)  # type: ignore[arg-type]


def make_inputs(
    case: Case, seed: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, ...]:
    """The inputs ``(X, *params)``, reproducible from ``seed``.

    For the seed's ``"sum"`` read-out, ``torch.rand`` as in the seed. For the ``"weighted"`` one,
    the same draws centred and scaled: ``X`` uniform in [-1, 1] and each parameter uniform in
    ``[-a, a]`` with ``a = sqrt(6 / width)`` (variance ``2 / width``), so the activations keep a
    magnitude of about one through every layer and the softmax is not saturated. They are drawn
    on the CPU and then moved, so every device sees the same values.
    """
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(case.batch, case.width, generator=gen, dtype=dtype)
    params = [
        torch.rand(case.width, case.width, generator=gen, dtype=dtype) for _ in range(case.depth)
    ]
    if case.readout == "weighted":
        bound = math.sqrt(6.0 / case.width)
        X = 2 * X - 1
        params = [(2 * P - 1) * bound for P in params]
    return tuple(t.to(device) for t in (X, *params))


@dataclass(frozen=True)
class Sweep:
    """An ordered list of cases varying one size (``x_name``), smallest first.

    ``quick`` holds the indices of the rows kept by ``--quick``. ``numeric_x`` is false for sweeps
    whose rows vary several things at once (the order-3/4 sweeps); those are plotted by row label.
    """

    name: str
    title: str
    x_name: str
    cases: tuple[Case, ...]
    quick: tuple[int, ...]
    numeric_x: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    def x_value(self, case: Case) -> int | str:
        """The swept value of a row (its label for non-numeric sweeps)."""
        return getattr(case, self.x_name) if self.numeric_x else case.label()

    def selected(self, quick: bool) -> list[Case]:
        """The rows to run."""
        return [self.cases[i] for i in self.quick] if quick else list(self.cases)


def _sized_sweep(
    name: str,
    title: str,
    x_name: str,
    values: Sequence[int],
    quick: Sequence[int],
    *,
    order: int,
    param_grad: bool,
    batch: int,
    width: int,
    depth: int,
    notes: Sequence[str] = (),
) -> Sweep:
    """A sweep of ``relu_softmax`` cases where ``x_name`` takes each of ``values``."""
    base = {"batch": batch, "width": width, "depth": depth}
    cases = tuple(
        Case("relu_softmax", order, param_grad, **{**base, x_name: v}) for v in values
    )
    return Sweep(name, title, x_name, cases, tuple(quick), notes=tuple(notes))


_BY_10_TO_80 = range(10, 81, 10)
_BY_5_TO_50 = range(5, 51, 5)


def _seed_sweeps() -> list[Sweep]:
    """The twelve loops of the seed notebook, in its order, with its sizes."""
    jac, hess = 1, 2
    return [
        _sized_sweep("jac_x_batch", "Jacobian wrt X vs batch (width 10, depth 3)", "batch",
                     _BY_10_TO_80, (0, 3, 7), order=jac, param_grad=False,
                     batch=0, width=10, depth=3),
        _sized_sweep("jac_x_width", "Jacobian wrt X vs width (batch 10, depth 3)", "width",
                     _BY_10_TO_80, (0, 3, 7), order=jac, param_grad=False,
                     batch=10, width=0, depth=3),
        _sized_sweep("jac_x_depth", "Jacobian wrt X vs depth (batch 60, width 20)", "depth",
                     range(2, 21), (0, 8, 18), order=jac, param_grad=False,
                     batch=60, width=20, depth=0),
        _sized_sweep("jac_all_batch", "Jacobian wrt X+params vs batch (width 10, depth 3)",
                     "batch", _BY_5_TO_50, (0, 4, 9), order=jac, param_grad=True,
                     batch=0, width=10, depth=3),
        _sized_sweep("jac_all_width", "Jacobian wrt X+params vs width (batch 10, depth 3)",
                     "width", _BY_5_TO_50, (0, 4, 9), order=jac, param_grad=True,
                     batch=10, width=0, depth=3),
        _sized_sweep("jac_all_depth", "Jacobian wrt X+params vs depth (batch 10, width 10)",
                     "depth", range(2, 7), (0, 2, 4), order=jac, param_grad=True,
                     batch=10, width=10, depth=0),
        _sized_sweep("hess_x_batch", "Hessian wrt X vs batch (width 10, depth 3)", "batch",
                     _BY_10_TO_80, (0, 3, 7), order=hess, param_grad=False,
                     batch=0, width=10, depth=3),
        _sized_sweep("hess_x_width", "Hessian wrt X vs width (batch 10, depth 3)", "width",
                     _BY_10_TO_80, (0, 2, 4), order=hess, param_grad=False,
                     batch=10, width=0, depth=3),
        _sized_sweep("hess_x_depth", "Hessian wrt X vs depth (batch 10, width 20)", "depth",
                     range(2, 11), (0, 4, 8), order=hess, param_grad=False,
                     batch=10, width=20, depth=0,
                     notes=("batch 10 as in the seed, where this loop reuses the batch size "
                            "left over from the previous cell",)),
        _sized_sweep("hess_all_batch", "Hessian wrt X+params vs batch (width 10, depth 3)",
                     "batch", _BY_5_TO_50, (0, 4, 9), order=hess, param_grad=True,
                     batch=0, width=10, depth=3),
        _sized_sweep("hess_all_width", "Hessian wrt X+params vs width (batch 10, depth 3)",
                     "width", _BY_5_TO_50, (0, 1, 2), order=hess, param_grad=True,
                     batch=10, width=0, depth=3),
        _sized_sweep("hess_all_depth", "Hessian wrt X+params vs depth (batch 10, width 10)",
                     "depth", range(2, 9), (0, 2, 4), order=hess, param_grad=True,
                     batch=10, width=10, depth=0),
    ]


# (batch, width, depth) rows of the order-3/4 sweeps, run for both models.
_HIGH_ORDER_SIZES: dict[tuple[int, bool], tuple[tuple[int, int, int], ...]] = {
    (3, False): ((2, 4, 2), (4, 4, 2), (8, 4, 2), (4, 8, 2), (4, 4, 3), (8, 8, 3)),
    (3, True): ((2, 4, 2), (4, 4, 2), (8, 4, 2), (4, 8, 2), (4, 4, 3)),
    (4, False): ((2, 4, 2), (4, 4, 2), (8, 4, 2), (4, 8, 2), (4, 4, 3)),
    (4, True): ((2, 4, 2), (4, 4, 2), (2, 4, 3)),
}


def _high_order_sweeps() -> list[Sweep]:
    """Order-3 and order-4 rows at small sizes for both models, wrt X and wrt X+params."""
    sweeps = []
    for (order, param_grad), sizes in _HIGH_ORDER_SIZES.items():
        cases = tuple(
            Case(model, order, param_grad, b, w, d)
            for model in ("relu_softmax", "tanh")
            for (b, w, d) in sizes
        )
        n = len(sizes)
        wrt = "X+params" if param_grad else "X"
        sweeps.append(Sweep(
            name=f"o{order}_{'all' if param_grad else 'x'}",
            title=f"Order-{order} derivative wrt {wrt} (relu/softmax and tanh MLPs)",
            x_name="label",
            cases=cases,
            quick=(0, 1, n, n + 1),
            numeric_x=False,
        ))
    return sweeps


SWEEPS: dict[str, Sweep] = {s.name: s for s in _seed_sweeps() + _high_order_sweeps()}

# The row measured by ``--memory``: the largest Hessian-with-params row of the seed.
MEMORY_SWEEP = "hess_all_width"
