"""Jets of the ops where torch's own higher-order formulas are wrong (layer_norm, batch_norm,
det, slogdet, linalg.solve, cholesky_solve, cholesky_inverse, householder_product, cumprod
at zeros) against a reference that uses no derivative formula at all: the path
``x(t) = x + sum_k s_k t^k / k!`` carried through the op as truncated power series in t
(products are Cauchy products; reciprocal, square root, logarithm and linear solves are
the textbook coefficient recurrences on values).

The series reference is first checked against nested torch.func on the same functions
written from plain ops whose derivatives torch composes correctly (the normalisations
from mean and rsqrt, det by the Leibniz formula, solves through ``inv``, cumprod by
successive products): both must agree before hod is compared with the series. The
exact Laplacian and biharmonic of the non-multilinear ones are checked too, against sums
of the series' univariate jets along unit vectors (and their pairwise sums and
differences).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_same_jets,
    assert_same_tree,
    exact_biharmonic,
    exact_laplacian,
    jet_reference,
)

import hod

D = torch.float64


class Series:
    """A tensor path by its normalized Taylor coefficients ``a_k = x^(k)(0) / k!``,
    ``k = 0..K``, stacked on a leading axis: ``a`` has shape ``(K + 1,) + shape``."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a = a

    @classmethod
    def path(cls, x: torch.Tensor, entry, order: int) -> Series:
        """``x + sum_k s_k t^k / k!``: ``entry`` a direction or a tuple ``(s_1, ...)``."""
        a = torch.zeros(order + 1, *x.shape, dtype=x.dtype)
        a[0] = x
        for k, s in enumerate(entry if isinstance(entry, tuple) else (entry,), start=1):
            a[k] = s / math.factorial(k)
        return cls(a)

    @property
    def order(self) -> int:
        return self.a.shape[0] - 1

    def derivatives(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(x(0), (x'(0), ..., x^(K)(0)))``, as ``hod.jet`` returns them."""
        return self.a[0], tuple(math.factorial(k) * self.a[k] for k in range(1, self.order + 1))

    def linear(self, fn: Callable) -> Series:
        """A linear map (a sum, a slice, a transpose) applied coefficient by coefficient."""
        return Series(torch.stack([fn(a) for a in self.a]))

    def _cauchy(self, other: Series, product: Callable) -> Series:
        return Series(torch.stack([
            sum(product(self.a[j], other.a[k - j]) for j in range(k + 1))
            for k in range(self.order + 1)
        ]))

    def __mul__(self, other: Series) -> Series:
        return self._cauchy(other, torch.mul)

    def __matmul__(self, other: Series) -> Series:
        return self._cauchy(other, torch.matmul)

    def __add__(self, other: Series | float) -> Series:
        if isinstance(other, Series):
            return Series(torch.stack([a + b for a, b in zip(self.a, other.a, strict=True)]))
        a = self.a.clone()
        a[0] = a[0] + other
        return Series(a)

    def __sub__(self, other: Series) -> Series:
        return self + other.scaled(-1.0)

    def scaled(self, c: float | torch.Tensor) -> Series:
        return Series(self.a * c)

    def reciprocal(self) -> Series:
        """``b_k = -(sum_{j=1..k} a_j b_{k-j}) / a_0``."""
        b = [1 / self.a[0]]
        for k in range(1, self.order + 1):
            b.append(-sum(self.a[j] * b[k - j] for j in range(1, k + 1)) / self.a[0])
        return Series(torch.stack(b))

    def sqrt(self) -> Series:
        """``b_k = (a_k - sum_{j=1..k-1} b_j b_{k-j}) / (2 b_0)``."""
        b = [self.a[0].sqrt()]
        for k in range(1, self.order + 1):
            b.append((self.a[k] - sum(b[j] * b[k - j] for j in range(1, k))) / (2 * b[0]))
        return Series(torch.stack(b))

    def log(self) -> Series:
        """``b_k = (a_k - (1/k) sum_{j=1..k-1} j b_j a_{k-j}) / a_0``."""
        b = [self.a[0].log()]
        for k in range(1, self.order + 1):
            rest = sum(j * b[j] * self.a[k - j] for j in range(1, k)) / k
            b.append((self.a[k] - rest) / self.a[0])
        return Series(torch.stack(b))

    def solve(self, rhs: Series) -> Series:
        """``X`` with ``self @ X = rhs``: ``X_k = A_0^{-1} (B_k - sum_{j=1..k} A_j X_{k-j})``."""
        A = self.a
        x: list[torch.Tensor] = []
        for k in range(self.order + 1):
            known = sum((A[j] @ x[k - j] for j in range(1, k + 1)), torch.zeros_like(rhs.a[k]))
            x.append(torch.linalg.solve(A[0], rhs.a[k] - known))
        return Series(torch.stack(x))


def stack(series: list[Series], dim: int) -> Series:
    """``torch.stack`` of the paths along ``dim`` (of the values, not the coefficient axis)."""
    return Series(torch.stack([s.a for s in series], dim=dim + 1 if dim >= 0 else dim))


def constant(x: torch.Tensor, order: int) -> Series:
    return Series.path(x, (), order)


# -- the ops as series ----------------------------------------------------------------------------
def normalized(x: Series, dims: tuple[int, ...], eps: float) -> Series:
    mean = x.linear(lambda a: a.mean(dims, keepdim=True))
    centered = x - mean
    variance = (centered * centered).linear(lambda a: a.mean(dims, keepdim=True))
    return centered * (variance + eps).sqrt().reciprocal()


def layer_norm_series(x: Series, w: Series, b: Series) -> Series:
    return normalized(x, (-1,), 1e-5) * w + b


def _channels(a: torch.Tensor) -> torch.Tensor:
    """A per-channel vector against ``(N, C, L)``."""
    return a[:, None]


def batch_norm_series(x: Series, w: Series, b: Series) -> Series:
    return normalized(x, (0, 2), 1e-5) * w.linear(_channels) + b.linear(_channels)


def det_series(A: Series) -> Series:
    """The Leibniz formula: a sum over permutations of products of entries."""
    n = A.a.shape[-1]
    total = None
    for perm in itertools.permutations(range(n)):
        sign = (-1) ** sum(p > q for i, p in enumerate(perm) for q in perm[i + 1:])
        term = A.linear(lambda a, p=perm[0]: a[..., 0, p])
        for i in range(1, n):
            term = term * A.linear(lambda a, i=i, p=perm[i]: a[..., i, p])
        total = term.scaled(sign) if total is None else total + term.scaled(sign)
    return total


def logabsdet_series(A: Series) -> Series:
    det = det_series(A)
    return det.scaled(det.a[0].sign()).log()


def gram(L: Series) -> Series:
    """``L L^T`` of the lower triangle (what the Cholesky ops read of their factor)."""
    lower = L.linear(torch.tril)
    return lower @ lower.linear(lambda a: a.transpose(-2, -1))


def cholesky_inverse_series(L: Series) -> Series:
    eye = torch.eye(L.a.shape[-1], dtype=D)
    return gram(L).solve(constant(eye, L.order))


def householder_series(A: Series, tau: Series) -> Series:
    """``H_1 ... H_k`` with ``H_i = I - tau_i v_i v_i^T``, ``v_i`` column i of A below the
    diagonal with a one on it; the first ``n`` columns."""
    m, n = A.a.shape[-2:]
    eye = constant(torch.eye(m, dtype=D), A.order)
    Q = eye
    for i in range(tau.a.shape[-1]):
        unit = torch.zeros(m, dtype=D)
        unit[i] = 1.0
        v = A.linear(lambda a, i=i: a.tril(-1)[:, i]) + constant(unit, A.order)
        outer = v.linear(lambda a: a[:, None]) * v.linear(lambda a: a[None, :])
        t = tau.linear(lambda a, i=i: a[i])
        Q = Q @ (eye - outer * t)
    return Q.linear(lambda a: a[:, :n])


def cumprod_series(x: Series, dim: int) -> Series:
    pieces = [x.linear(lambda a, j=j: a.select(dim, j)) for j in range(x.a.shape[dim + 1])]
    running = [pieces[0]]
    for piece in pieces[1:]:
        running.append(running[-1] * piece)
    return stack(running, dim)


# -- the same functions from plain ops, for torch.func --------------------------------------------
def _normalized_plain(x: torch.Tensor, dims, eps: float) -> torch.Tensor:
    mean = x.mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)


def _leibniz_det(a: torch.Tensor) -> torch.Tensor:
    n = a.shape[-1]
    total = a.new_zeros(a.shape[:-2])
    for perm in itertools.permutations(range(n)):
        sign = (-1) ** sum(p > q for i, p in enumerate(perm) for q in perm[i + 1:])
        total = total + sign * torch.stack([a[..., i, p] for i, p in enumerate(perm)]).prod(0)
    return total


def _householder_plain(A: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    m, n = A.shape
    Q = torch.eye(m, dtype=D)
    for i in range(tau.shape[0]):
        v = A.tril(-1)[:, i] + torch.eye(m, dtype=D)[:, i]
        Q = Q @ (torch.eye(m, dtype=D) - tau[i] * torch.outer(v, v))
    return Q[:, :n]


def _cumprod_plain(x: torch.Tensor, dim: int) -> torch.Tensor:
    pieces = x.unbind(dim)
    running = [pieces[0]]
    for piece in pieces[1:]:
        running.append(running[-1] * piece)
    return torch.stack(running, dim)


# -- cases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """``fn`` as a user writes it, ``plain`` the same from plain ops, ``series`` on
    :class:`Series` (every argument differentiated); ``triangles`` maps the arguments whose
    directions are triangular (a Cholesky factor: the op reads one triangle only) to
    ``torch.tril`` or ``torch.triu``;
    ``degree`` the degree of a polynomial ``fn``: along a direction, higher coefficients
    are zero."""

    fn: Callable
    plain: Callable
    series: Callable
    samples: Callable[[], list[tuple]]
    triangles: dict[int, Callable] = field(default_factory=dict)
    degree: int | None = None

    def vanishes(self, kind: str, k: int) -> bool:
        return kind == "direction" and self.degree is not None and k > self.degree


def _spd_factor(n: int) -> torch.Tensor:
    a = torch.rand(n, n, dtype=D)
    return torch.linalg.cholesky(a @ a.T + n * torch.eye(n, dtype=D))


def _factor_filled_above(n: int) -> torch.Tensor:
    """A lower Cholesky factor with other numbers above its diagonal (as LAPACK leaves a
    factor computed in place; transposed, an upper one filled below): torch's Cholesky ops
    read only the factor's own triangle."""
    return _spd_factor(n) + torch.triu(torch.rand(n, n, dtype=D), 1)


def _gram_plain(L: torch.Tensor) -> torch.Tensor:
    return L.tril() @ L.tril().T


def _cholesky_solve_plain(b: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(_gram_plain(L)) @ b


def _cholesky_solve_series(b: Series, L: Series) -> Series:
    return gram(L).solve(b)


def _transposed(a: torch.Tensor) -> torch.Tensor:
    """An upper factor ``U`` as the lower factor ``U^T`` (``U^T U = L L^T``)."""
    return a.mT


def _well_conditioned(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, dtype=D) * 2 - 1 + 3 * torch.eye(shape[-1], dtype=D)


def _negative_det(n: int) -> torch.Tensor:
    a = _well_conditioned(n, n)
    return a[[1, 0, *range(2, n)]]  # two rows swapped


def _with_zeros(zeros: list[tuple[int, int]]) -> torch.Tensor:
    x = torch.rand(3, 4, dtype=D) + 0.5
    x[:, 0] *= -1
    for at in zeros:
        x[at] = 0.0
    return x


def _rand(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, dtype=D) * 2 - 1


CASES = {
    "layer_norm": Case(
        lambda x, w, b: F.layer_norm(x, (4,), w, b, eps=1e-5),
        lambda x, w, b: _normalized_plain(x, (-1,), 1e-5) * w + b, layer_norm_series,
        lambda: [(_rand(3, 4), _rand(4), _rand(4))]),
    "batch_norm": Case(
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-5),
        lambda x, w, b: _normalized_plain(x, (0, 2), 1e-5) * w[:, None] + b[:, None],
        batch_norm_series, lambda: [(_rand(4, 3, 2), _rand(3), _rand(3))]),
    "det": Case(torch.linalg.det, _leibniz_det, det_series,
                lambda: [(_well_conditioned(3, 3),), (_negative_det(3),),
                         (_well_conditioned(2, 3, 3),)], degree=3),
    "slogdet": Case(lambda a: torch.linalg.slogdet(a)[1],
                    lambda a: _leibniz_det(a).abs().log(), logabsdet_series,
                    lambda: [(_well_conditioned(3, 3),), (_negative_det(3),)]),
    "solve": Case(torch.linalg.solve, lambda a, b: torch.linalg.inv(a) @ b,
                  lambda a, b: a.solve(b),
                  lambda: [(_well_conditioned(3, 3), _rand(3, 2))]),
    "cholesky_solve": Case(
        lambda b, L: torch.cholesky_solve(b, L), _cholesky_solve_plain, _cholesky_solve_series,
        lambda: [(_rand(3, 2), _spd_factor(3)), (_rand(3, 2), _factor_filled_above(3))],
        triangles={1: torch.tril}),
    "cholesky_solve_upper": Case(
        lambda b, U: torch.cholesky_solve(b, U, upper=True),
        lambda b, U: _cholesky_solve_plain(b, U.mT),
        lambda b, U: _cholesky_solve_series(b, U.linear(_transposed)),
        lambda: [(_rand(3, 2), _spd_factor(3).mT), (_rand(3, 2), _factor_filled_above(3).mT)],
        triangles={1: torch.triu}),
    "cholesky_inverse": Case(
        torch.cholesky_inverse, lambda L: torch.linalg.inv(_gram_plain(L)),
        cholesky_inverse_series,
        lambda: [(_spd_factor(3),), (_factor_filled_above(3),)], triangles={0: torch.tril}),
    "cholesky_inverse_upper": Case(
        lambda U: torch.cholesky_inverse(U, upper=True),
        lambda U: torch.linalg.inv(_gram_plain(U.mT)),
        lambda U: cholesky_inverse_series(U.linear(_transposed)),
        lambda: [(_spd_factor(3).mT,), (_factor_filled_above(3).mT,)],
        triangles={0: torch.triu}),
    "householder_product": Case(
        torch.linalg.householder_product, _householder_plain, householder_series,
        lambda: [(_rand(4, 3), torch.rand(3, dtype=D) + 0.5)]),
    "cumprod_zeros_dim1": Case(
        lambda x: x.cumprod(1), lambda x: _cumprod_plain(x, 1), lambda x: cumprod_series(x, 1),
        lambda: [(_with_zeros([(1, 2)]),), (_with_zeros([(1, 0), (1, 2)]),),
                 (_with_zeros([(0, 0), (0, 2), (2, 3)]),)], degree=4),
    "cumprod_zeros_dim0": Case(
        lambda x: x.cumprod(0), lambda x: _cumprod_plain(x, 0), lambda x: cumprod_series(x, 0),
        lambda: [(_with_zeros([(1, 2)]),), (_with_zeros([(0, 1), (2, 1)]),)], degree=3),
}


def _series_for(case: Case, sample: tuple, order: int, kind: str) -> tuple:
    """One entry per argument: a direction or ``order`` coefficients, triangular for a
    Cholesky factor."""
    def draw(i: int) -> torch.Tensor:
        v = torch.randn(sample[i].shape, dtype=D)
        return case.triangles[i](v) if i in case.triangles else v

    return tuple(draw(i) if kind == "direction" else tuple(draw(i) for _ in range(order))
                 for i in range(len(sample)))


def series_reference(case: Case, sample: tuple, series: tuple, order: int):
    paths = [Series.path(x, entry, order) for x, entry in zip(sample, series, strict=True)]
    return case.series(*paths).derivatives()


def _cases():
    for name in CASES:
        for kind in ("direction", "series"):
            for order in (1, 2, 3, 4):
                marks = [pytest.mark.slow] if order == 4 else []
                yield pytest.param(name, kind, order, id=f"{name}-{kind}-order{order}",
                                   marks=marks)


@pytest.mark.parametrize("name, kind, order", list(_cases()))
def test_the_series_reference_is_torch_funcs_on_plain_ops(name, kind, order):
    case = CASES[name]
    argnums = tuple(range(len(case.samples()[0])))
    for sample in case.samples():
        series = _series_for(case, sample, order, kind)
        assert_same_jets([series_reference(case, sample, series, order)],
                         [jet_reference(case.plain, order, argnums)(sample, series)],
                         rtol=1e-8, atol=1e-8, vanishes=lambda k: case.vanishes(kind, k))


@pytest.mark.parametrize("name, kind, order", list(_cases()))
def test_jet_against_the_series_reference(name, kind, order):
    case = CASES[name]
    argnums = tuple(range(len(case.samples()[0])))
    jf = hod.jet(case.fn, order, argnums)
    actual, expected = [], []
    for sample in case.samples():
        series = _series_for(case, sample, order, kind)
        actual.append(jf(sample, series))
        expected.append(series_reference(case, sample, series, order))
    assert_same_jets(actual, expected, rtol=1e-8, atol=1e-8,
                     vanishes=lambda k: case.vanishes(kind, k))


def _singular(n: int) -> torch.Tensor:
    """A rank ``n - 1`` matrix: its last row is the sum of the others."""
    a = torch.rand(n, n, dtype=D)
    a[-1] = a[:-1].sum(0)
    return a


@pytest.mark.parametrize("order", [1, 2, 3])
def test_det_jet_at_a_singular_matrix(order):
    """det is a polynomial: its jets exist at a singular matrix, where a formula through the
    inverse (``det(A) tr(A^-1 dA)``) has none."""
    a = _singular(3)
    v = torch.randn(3, 3, dtype=D)
    expected = det_series(Series.path(a, v, order)).derivatives()
    actual = hod.jet(torch.linalg.det, order)((a,), v)
    assert_same_jets([actual], [expected], rtol=1e-8, atol=1e-8, vanishes=lambda k: k == 0)


def _unit(x: torch.Tensor, i: int) -> torch.Tensor:
    e = torch.zeros(x.numel(), dtype=D)
    e[i] = 1.0
    return e.reshape(x.shape)


def _coefficient(case: Case, sample: tuple, direction: torch.Tensor, k: int) -> torch.Tensor:
    """``c_k`` of the series reference along ``direction`` in argument 0 only."""
    series = (direction, *(torch.zeros_like(a) for a in sample[1:]))
    return series_reference(case, sample, series, k)[1][k - 1]


def laplacian_reference(case: Case, sample: tuple) -> torch.Tensor:
    """``sum_i c_2(e_i)`` over the entries of argument 0."""
    x = sample[0]
    return sum(_coefficient(case, sample, _unit(x, i), 2) for i in range(x.numel()))


def biharmonic_reference(case: Case, sample: tuple) -> torch.Tensor:
    """``sum_i T_iiii + sum_{i != j} T_iijj`` from univariate 4-jets, with
    ``T_iijj = (c_4(e_i + e_j) + c_4(e_i - e_j) - 2 c_4(e_i) - 2 c_4(e_j)) / 12``."""
    x = sample[0]
    units = [_unit(x, i) for i in range(x.numel())]
    pure = [_coefficient(case, sample, e, 4) for e in units]
    total = sum(pure)
    for i, j in itertools.permutations(range(x.numel()), 2):
        mixed = (_coefficient(case, sample, units[i] + units[j], 4)
                 + _coefficient(case, sample, units[i] - units[j], 4))
        total = total + (mixed - 2 * pure[i] - 2 * pure[j]) / 12
    return total


# Left out: det and cumprod are linear in each entry (their Laplacian and biharmonic are
# zero), cholesky_solve is linear in its argument 0, and a Cholesky factor's own operators
# would sum over the upper triangle, which the ops do not read.
OPERATOR_CASES = ["layer_norm", "batch_norm", "slogdet", "solve", "householder_product"]


@pytest.mark.parametrize("name", OPERATOR_CASES)
def test_laplacian_against_the_series_reference(name):
    """The collapsed exact Laplacian in argument 0."""
    case = CASES[name]
    for sample in case.samples():
        actual = hod.laplacian(case.fn)(*sample)
        assert_same_tree(actual, laplacian_reference(case, sample), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", OPERATOR_CASES)
def test_biharmonic_against_the_series_reference(name):
    case = CASES[name]
    sample = case.samples()[0]
    actual = hod.biharmonic(case.fn)(*sample)
    assert_same_tree(actual, biharmonic_reference(case, sample), rtol=1e-7, atol=1e-7)


def test_the_operator_references_are_torch_funcs_traces_on_plain_ops():
    """The sums of univariate jets above are the Laplacian and biharmonic of torch.func's
    derivative tensors (solve through inv, a 3 x 3 system with two right-hand sides)."""
    case = CASES["solve"]
    sample = case.samples()[0]
    assert_same_tree(laplacian_reference(case, sample), exact_laplacian(case.plain, sample),
                     rtol=1e-8, atol=1e-8)
    assert_same_tree(biharmonic_reference(case, sample), exact_biharmonic(case.plain, sample),
                     rtol=1e-7, atol=1e-7)
