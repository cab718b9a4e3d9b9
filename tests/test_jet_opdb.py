"""Every op database entry in jet mode: ``hod.jet`` at orders 1-4, along a random direction
and with a full input series ``(s_1, ..., s_k)``, against k nested ``torch.func.jvp`` over the
path parameter t (float64); a subset in float32.

The quick run covers every entry along a direction at order 2 and with a full series at
order 3 (whose coefficient sums every partition of 3 over s_1, s_2, s_3); the other orders
and kinds are marked ``slow``. Along a direction, the coefficients above an entry's
``degree`` must be zero and the ones below must not; with a series they need not vanish
(``x(t)`` itself is a polynomial of degree k).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_same_jets, cast, jet_reference
from opdb import OPS, OpInfo

import hod

KINDS = ("direction", "series")
QUICK = {("direction", 2), ("series", 3)}


def _huber(x, y, delta: float = 0.5):
    d = (x - y).abs()
    return torch.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean()


#: Where nested jvp cannot run the entry's own reference: torch has no forward-mode formula
#: for huber_loss_backward (which huber_loss's own forward-mode formula calls).
JET_REFS = {"huber_loss": _huber}

#: Degrees the database leaves unstated because its orders stop below them: a 3 x 3
#: determinant is a polynomial of degree 3, so its fourth coefficient along a line is zero.
JET_DEGREES = {"det": 3, "det.forward": 3}


def _vanishes(info: OpInfo, kind: str, k: int) -> bool:
    """Along a direction, coefficients above the entry's degree are zero."""
    degree = JET_DEGREES.get(info.name, info.degree)
    return kind == "direction" and degree is not None and k > degree


def series_for(sample: tuple, argnums, order: int, kind: str):
    """One entry per differentiated argument, as ``hod.jet`` takes it: a random direction
    shaped like the primal, or ``order`` random coefficients."""
    def entry(primal: torch.Tensor):
        if kind == "direction":
            return torch.randn(primal.shape, dtype=torch.float64)
        return tuple(torch.randn(primal.shape, dtype=torch.float64) for _ in range(order))

    if isinstance(argnums, int):
        return entry(sample[argnums])
    return tuple(entry(sample[i]) for i in argnums)


def check_jets(info: OpInfo, order: int, kind: str, dtype=torch.float64) -> None:
    """``hod.jet`` on every sample of ``info`` cast to ``dtype``, against the float64
    reference, order by order (each order has its own zero test)."""
    jf = hod.jet(info.fn, order, info.argnums)
    ref = jet_reference(JET_REFS.get(info.name) or info.ref or info.fn, order, info.argnums)
    rtol, atol = (info.rtol, info.atol) if dtype == torch.float64 else TOLERANCES[dtype]
    actual, expected = [], []
    for sample in info.samples():
        series = series_for(sample, info.argnums, order, kind)
        actual.append(jf(cast(sample, dtype), cast(series, dtype)))
        expected.append(cast(ref(sample, series), dtype))
    assert_same_jets(actual, expected, rtol=rtol, atol=atol,
                     vanishes=lambda k: _vanishes(info, kind, k))


def _cases():
    for info in OPS:
        for kind in KINDS:
            for order in (1, 2, 3, 4):
                marks = [] if (kind, order) in QUICK else [pytest.mark.slow]
                yield pytest.param(info, order, kind, id=f"{info.name}-{kind}-order{order}",
                                   marks=marks)


@pytest.mark.parametrize("info, order, kind", list(_cases()))
def test_jet_matches_nested_jvp(info: OpInfo, order: int, kind: str):
    check_jets(info, order, kind)


# Entries whose samples and closures hold no float64 constants, one or two per family.
FLOAT32 = [
    "tanh", "exp.sum", "log", "sigmoid", "softplus", "gelu", "mul", "div", "pow", "mm",
    "matmul_batched.sum", "conv2d", "inv", "softmax", "log_softmax", "layer_norm",
    "cross_entropy", "mse_loss", "logsumexp", "prod_dim", "cumsum.sum", "var", "norm_rows",
    "index_rows", "gather.sum", "cat", "max_pool2d", "attention",
]
_BY_NAME = {info.name: info for info in OPS}


@pytest.mark.parametrize("kind, order", [("direction", 2), ("series", 3)])
@pytest.mark.parametrize("name", FLOAT32)
def test_jet_in_float32(name: str, kind: str, order: int):
    check_jets(_BY_NAME[name], order, kind, torch.float32)
