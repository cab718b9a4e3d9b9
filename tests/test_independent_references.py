"""Inputs where torch.func's own higher derivatives are wrong, checked against references
that do not use its formulas: products with zero factors (prod, cumprod) against the
exact derivatives of a product, and vector norms to order 4 against the norm written
from elementary ops (abs, pow, sum), whose derivatives torch.func composes correctly."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, reference

import hod

D = torch.float64


def product_derivative(x: torch.Tensor, groups: list[list[int]], order: int) -> torch.Tensor:
    """D^order of the products ``y_r = prod(x.flatten()[g] for g in groups[r])``, shape
    ``(len(groups),) + x.shape * order``: the entry at distinct flat indices ``i_1..i_k``
    of group r is the product of the group's other factors, any other entry is zero
    (each factor appears once, so a repeated index differentiates it twice)."""
    flat = x.flatten()
    out = torch.zeros(len(groups), *([flat.numel()] * order), dtype=x.dtype)
    for r, group in enumerate(groups):
        for picked in itertools.permutations(group, order):
            rest = [flat[i] for i in group if i not in picked]
            out[(r, *picked)] = math.prod(rest) if rest else 1.0
    return out.reshape(len(groups), *(x.shape * order))


def prod_groups(shape: tuple[int, ...], dim: int | None) -> list[list[int]]:
    """The flat indices each output of ``x.prod(dim)`` multiplies, in output order."""
    index = torch.arange(math.prod(shape)).reshape(shape)
    if dim is None:
        return [index.flatten().tolist()]
    return index.movedim(dim, -1).reshape(-1, shape[dim]).tolist()


def cumprod_groups(shape: tuple[int, ...], dim: int) -> list[list[int]]:
    """The flat indices each output of ``x.cumprod(dim)`` multiplies (a prefix along
    ``dim``), in output order."""
    index = torch.arange(math.prod(shape)).reshape(shape).movedim(dim, -1)
    prefixes = [[row[: j + 1].tolist() for j in range(len(row))]
                for row in index.reshape(-1, shape[dim])]
    order = torch.arange(index.numel()).reshape(index.shape).movedim(-1, dim).flatten()
    flat = [p for row in prefixes for p in row]  # outputs in index's (moved) order
    return [flat[i] for i in order.tolist()]


def _with_zeros(shape: tuple[int, ...], zeros: list[tuple[int, ...]]) -> torch.Tensor:
    x = torch.rand(*shape, dtype=D) + 0.5
    x[..., 0] *= -1  # signs too
    for at in zeros:
        x[at] = 0.0
    return x


# (name, fn, groups of the flat inputs each output multiplies, output shape of fn)
PRODUCTS = [
    ("prod", lambda x: x.prod(), lambda s: prod_groups(s, None), lambda s: ()),
    ("prod_dim1", lambda x: x.prod(1), lambda s: prod_groups(s, 1), lambda s: (s[0],)),
    ("prod_dim0_keepdim", lambda x: x.prod(0, keepdim=True), lambda s: prod_groups(s, 0),
     lambda s: (1, s[1])),
    ("cumprod_dim1", lambda x: x.cumprod(1), lambda s: cumprod_groups(s, 1), lambda s: s),
    ("cumprod_dim0", lambda x: x.cumprod(0), lambda s: cumprod_groups(s, 0), lambda s: s),
]
ZEROS = {
    "one-zero": [(1, 2)],
    "two-zeros-one-row": [(1, 0), (1, 2)],
    "two-zeros-apart": [(0, 1), (2, 3)],
    "three-zeros": [(0, 0), (0, 2), (2, 3)],
}
SHAPE = (3, 4)


def _expected(name_groups, out_shape, x: torch.Tensor, order: int) -> torch.Tensor:
    d = product_derivative(x, name_groups(tuple(x.shape)), order)
    return d.reshape(*out_shape(tuple(x.shape)), *(x.shape * order))


@pytest.mark.parametrize("name, fn, groups, out_shape", PRODUCTS, ids=[p[0] for p in PRODUCTS])
def test_the_product_formula_is_torch_funcs_without_zeros(name, fn, groups, out_shape):
    """The manual reference is right where torch.func is (no zero factor)."""
    x = _with_zeros(SHAPE, [])
    for order in (1, 2, 3):
        assert_same_tree(_expected(groups, out_shape, x, order), reference(fn, order)(x))


def _product_cases(orders: list[int]):
    for name, fn, groups, out_shape in PRODUCTS:
        for zeros_name, zeros in ZEROS.items():
            for order in orders:
                yield pytest.param(fn, groups, out_shape, zeros, order,
                                   id=f"{name}-{zeros_name}-order{order}")


@pytest.mark.parametrize("fn, groups, out_shape, zeros, order", list(_product_cases([1, 2, 3, 4])))
def test_products_with_zero_factors(fn, groups, out_shape, zeros, order):
    x = _with_zeros(SHAPE, zeros)
    assert_same_tree(hod.derivative(fn, order)(x), _expected(groups, out_shape, x, order),
                     expect_zero=_vanishes(x, groups(SHAPE), order))


def _vanishes(x: torch.Tensor, groups: list[list[int]], order: int) -> bool:
    """Whether every product has fewer than ``order`` factors, or keeps a zero factor
    after any ``order`` of them are differentiated away."""
    flat = x.flatten()
    return all(len(group) < order or sum(bool(flat[i] == 0) for i in group) > order
               for group in groups)


@pytest.mark.parametrize("zeros", list(ZEROS.values()), ids=list(ZEROS))
def test_products_with_zero_factors_in_float32(zeros):
    x = _with_zeros(SHAPE, zeros)
    rtol, atol = TOLERANCES[torch.float32]
    for fn, groups, out_shape in ((p[1], p[2], p[3]) for p in PRODUCTS):
        for order in (2, 3):
            expected = _expected(groups, out_shape, x, order).float()
            assert_same_tree(hod.derivative(fn, order)(x.float()), expected, rtol=rtol, atol=atol,
                             expect_zero=_vanishes(x, groups(SHAPE), order))


def _away_from_zero(*shape: int) -> torch.Tensor:
    """Entries in ``[0.3, 1)`` in size, both signs, no ties in size (norms are smooth)."""
    size = torch.rand(*shape, dtype=D) * 0.7 + 0.3
    return size * (torch.randint(0, 2, shape, dtype=D) * 2 - 1)


def _elementary(p: float, dim=None, keepdim: bool = False) -> Callable:
    """The p-norm from abs, pow and sum (amax/amin for p = +-inf)."""
    def norm(x):
        if p == math.inf:
            return x.abs().amax(dim if dim is not None else tuple(range(x.dim())), keepdim)
        if p == -math.inf:
            return x.abs().amin(dim if dim is not None else tuple(range(x.dim())), keepdim)
        return (x.abs() ** p).sum(dim, keepdim) ** (1 / p)
    return norm


vector_norm = torch.linalg.vector_norm
# (id, the norm as a user writes it, p, dim, keepdim)
NORMS = [
    ("vector_norm-2", lambda x: vector_norm(x), 2, None, False),
    ("norm-2-dim1", lambda x: x.norm(dim=1), 2, 1, False),
    ("vector_norm-3-dims", lambda x: vector_norm(x, 3, dim=(0, 1)), 3, (0, 1), False),
    ("vector_norm-3.5-keepdim", lambda x: vector_norm(x, 3.5, dim=-1, keepdim=True), 3.5, -1,
     True),
    ("norm-p3.5", lambda x: x.norm(p=3.5), 3.5, None, False),
    ("linalg.norm-4-dim0", lambda x: torch.linalg.norm(x, 4, dim=0), 4, 0, False),
    ("vector_norm-1.5", lambda x: vector_norm(x, 1.5, dim=1), 1.5, 1, False),
    ("vector_norm-1", lambda x: vector_norm(x, 1, dim=1), 1, 1, False),
    ("vector_norm-inf", lambda x: vector_norm(x, math.inf, dim=1), math.inf, 1, False),
    ("vector_norm-neg-inf", lambda x: vector_norm(x, -math.inf), -math.inf, None, False),
]


def _norm_cases(orders: list[int]):
    for name, fn, p, dim, keepdim in NORMS:
        for order in orders:
            yield pytest.param(fn, _elementary(p, dim, keepdim), p, order,
                               id=f"{name}-order{order}")


@pytest.mark.parametrize("fn, elementary, p, order", list(_norm_cases([1, 2, 3, 4])))
def test_norms_against_the_norm_from_elementary_ops(fn, elementary, p, order):
    """Piecewise linear norms (p = 1, +-inf) have zero derivatives from order 2 on."""
    x = _away_from_zero(3, 4)
    assert_same_tree(hod.derivative(fn, order)(x), reference(elementary, order)(x),
                     expect_zero=order >= 2 and p in (1, math.inf, -math.inf))


@pytest.mark.parametrize("fn, elementary, p, order", list(_norm_cases([2, 3])))
def test_norms_in_float32(fn, elementary, p, order):
    x = _away_from_zero(3, 4)
    rtol, atol = TOLERANCES[torch.float32]
    expected = cast(reference(elementary, order)(x), torch.float32)
    assert_same_tree(hod.derivative(fn, order)(x.float()), expected, rtol=rtol, atol=atol,
                     expect_zero=p in (1, math.inf, -math.inf))


@pytest.mark.parametrize("p, dim", [(3.5, -1), (1.5, None), (4, 0)])
def test_the_elementary_norm_is_right_at_order_4(p, dim):
    """The reference itself: its order 4 is the central difference of its order 3
    (step 1e-4, error of order 1e-8 relative)."""
    x, step = _away_from_zero(3, 4), 1e-4
    third = reference(_elementary(p, dim), 3)
    columns = []
    for i in range(x.numel()):
        bump = torch.zeros(x.numel(), dtype=D)
        bump[i] = step
        bump = bump.reshape(x.shape)
        columns.append((third(x + bump) - third(x - bump)) / (2 * step))
    differences = torch.stack(columns, dim=-1).reshape(*columns[0].shape, *x.shape)
    assert_same_tree(differences, reference(_elementary(p, dim), 4)(x), rtol=1e-5, atol=1e-6)
