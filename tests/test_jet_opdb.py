"""Every op database entry in jet mode: ``hod.jet`` at orders 1-4, along a random direction
and with a full input series ``(s_1, ..., s_k)``, against k nested ``torch.func.jvp`` over the
path parameter t (float64); a subset in float32. Each entry's collapsed operators too: the
exact and a weighted Laplacian against torch.func's Hessian, the biharmonic against its
fourth derivative.

The quick run covers every entry along a direction at order 2 and with a full series at
order 3 (whose coefficient sums every partition of 3 over s_1, s_2, s_3); the other orders
and kinds are marked ``slow``. Along a direction, the coefficients above an entry's
``degree`` must be zero and the ones below must not; with a series they need not vanish
(``x(t)`` itself is a polynomial of degree k). Both Laplacians run for every entry in the
quick run, the biharmonic (entries with up to 12 inputs) is ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TOLERANCES,
    assert_same_jets,
    assert_same_tree,
    cast,
    exact_biharmonic,
    exact_laplacian,
    flat_reference,
    jet_reference,
)
from opdb import OPS, OpInfo
from torch.utils._pytree import tree_map

import hod
import hod.passes.memory

KINDS = ("direction", "series")
QUICK = {("direction", 2), ("series", 3)}


def _huber(x, y, delta: float = 0.5):
    d = (x - y).abs()
    return torch.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean()


def _norm_3_5(x):
    return (x.abs() ** 3.5).sum(-1, keepdim=True) ** (1 / 3.5)


#: Where torch.func cannot run the entry's own reference: torch has no forward-mode formula
#: for huber_loss_backward (which huber_loss's own forward-mode formula calls), and its
#: fourth derivative of the 3.5-norm fails (an in-place pow_ under vmap).
JET_REFS = {"huber_loss": _huber, "vector_norm_p3.5": _norm_3_5}


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
    ref = jet_reference(_reference_fn(info), order, info.argnums)
    rtol, atol = (info.rtol, info.atol) if dtype == torch.float64 else TOLERANCES[dtype]
    actual, expected = [], []
    for sample in info.samples():
        series = series_for(sample, info.argnums, order, kind)
        actual.append(jf(cast(sample, dtype), cast(series, dtype)))
        expected.append(cast(ref(sample, series), dtype))
    assert_same_jets(actual, expected, rtol=rtol, atol=atol,
                     vanishes=lambda k: kind == "direction" and info.vanishes_at(k))


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


# -- collapsed operators per entry --------------------------------------------------------------
def _reference_fn(info: OpInfo):
    """The function the references differentiate (see :data:`JET_REFS`)."""
    return JET_REFS.get(info.name) or info.ref or info.fn


def _numel(info: OpInfo, sample: tuple) -> int:
    positions = (info.argnums,) if isinstance(info.argnums, int) else info.argnums
    return sum(sample[i].numel() for i in positions)


#: Entries with a zero Laplacian: linear in each input entry (products of distinct entries,
#: so every ``d^2 f / dx_i^2`` is zero), or harmonic (atan2(y, x)).
HARMONIC = {"prod", "prod_dim", "prod_rows", "cumprod", "cumprod.sum", "det", "det.forward",
            "det.expanded", "matmul_2d", "mul", "where", "atan2", "atan2_near_axis"}
#: A zero biharmonic besides: the standard deviation of 4 entries is a Euclidean norm in the
#: 3-dimensional subspace orthogonal to (1, 1, 1, 1), and the Laplacian 2 / r of a norm in
#: three dimensions is harmonic.
BIHARMONIC = HARMONIC | {"std"}


def _operator_vanishes(info: OpInfo, order: int) -> bool:
    zero = HARMONIC if order == 2 else BIHARMONIC
    return info.name in zero or info.vanishes_at(order)


@pytest.mark.parametrize("info", OPS, ids=[i.name for i in OPS])
def test_exact_laplacian(info: OpInfo):
    """The collapsed exact Laplacian over the entry's differentiated inputs (batch
    compression decided at trace time) against the trace of torch.func's Hessian."""
    lap = hod.laplacian(info.fn, info.argnums)
    actual, expected = [], []
    for sample in info.samples():
        actual.append(lap(*sample))
        expected.append(exact_laplacian(_reference_fn(info), sample, info.argnums))
    assert_same_tree(actual, expected, rtol=info.rtol, atol=info.atol,
                     expect_zero=_operator_vanishes(info, 2))


@pytest.mark.parametrize("info", OPS, ids=[i.name for i in OPS])
def test_weighted_laplacian(info: OpInfo):
    """``sum_ij C_ij d2f/dx_i dx_j`` with a random dense ``C``: cross terms between inputs
    too (nonzero for products, whose plain Laplacian is zero)."""
    actual, expected = [], []
    for sample in info.samples():
        n = _numel(info, sample)
        C = torch.randn(n, n, dtype=torch.float64)
        actual.append(hod.laplacian(info.fn, info.argnums, weights=C)(*sample))
        expected.append(tree_map(lambda H, C=C: (H * C).sum((-2, -1)),
                                 flat_reference(_reference_fn(info), sample, 2, info.argnums)))
    assert_same_tree(actual, expected, rtol=info.rtol, atol=info.atol,
                     expect_zero=info.vanishes_at(2))


#: The biharmonic's reference is a dense fourth derivative: entries up to this many inputs.
BIHARMONIC_MAX_INPUTS = 12


@pytest.mark.slow
@pytest.mark.parametrize(
    "info", [i for i in OPS if all(_numel(i, s) <= BIHARMONIC_MAX_INPUTS for s in i.samples())],
    ids=lambda i: i.name)
def test_exact_biharmonic(info: OpInfo):
    bih = hod.biharmonic(info.fn, info.argnums)
    actual, expected = [], []
    for sample in info.samples():
        actual.append(bih(*sample))
        expected.append(exact_biharmonic(_reference_fn(info), sample, info.argnums))
    assert_same_tree(actual, expected, rtol=info.rtol, atol=info.atol,
                     expect_zero=_operator_vanishes(info, 4))


def _other(sample: tuple) -> tuple:
    return tuple(t * 0.97 if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in sample)


@pytest.mark.parametrize("info", OPS, ids=[i.name for i in OPS])
def test_jet_and_laplacian_with_every_tensor_in_reused_memory(info: OpInfo, monkeypatch):
    """The planned Taylor code (every tensor written into the arena or a result slot): a
    series jet of order 2 and the exact Laplacian, on a first call and on a second one with
    other inputs while the first's results are held."""
    monkeypatch.setattr(hod.passes.memory, "MIN_PLANNED_BYTES", 0)
    jf, lap = hod.jet(info.fn, 2, info.argnums), hod.laplacian(info.fn, info.argnums)
    ref = jet_reference(_reference_fn(info), 2, info.argnums)
    jets, jets_expected, laps, laps_expected = [], [], [], []
    for sample in info.samples():
        series = series_for(sample, info.argnums, 2, "series")
        # Linear entries may leave nothing to plan (their coefficients are the op on s_k).
        if not info.vanishes_at(2):
            assert jf.lower(sample, series).memory is not None, "nothing planned: a weak test"
        if not _operator_vanishes(info, 2):  # a zero Laplacian is a constant: nothing to plan
            assert lap.lower(*sample).memory is not None, "nothing planned: a weak test"
        for args in (sample, _other(sample)):
            jets.append(jf(args, series))
            laps.append(lap(*args))
            jets_expected.append(ref(args, series))
            laps_expected.append(exact_laplacian(_reference_fn(info), args, info.argnums))
    assert_same_jets(jets, jets_expected, rtol=info.rtol, atol=info.atol)
    assert_same_tree(laps, laps_expected, rtol=info.rtol, atol=info.atol,
                     expect_zero=_operator_vanishes(info, 2))
