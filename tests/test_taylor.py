"""Taylor mode (``hod.jet``, ``hod.hvp``, ``hod.laplacian``, ``hod.biharmonic``,
``hod.operator``) against nested torch.func in float64: exact operators against the traces
and contractions of torch.func's derivative tensors, stochastic ones against the same
contraction with the directions hod drew (read back through a probe), and all of them
with pytrees, argnums tuples, vmap, autograd (a PINN loss trains a network), torch.compile
and ``.lower(...).code``.

**Reading the directions back.** With its generator seeded alike, a stochastic estimate
draws the same directions for any function of an input of the same shape. Its value is a
linear function of the input's derivative tensor of the operator's order (a Laplacian:
the Hessian ``H``; a biharmonic: the fourth derivative ``T``), so the estimate of the
probe ``x_a x_b`` (or ``x_a x_b x_c x_d``) reads off the coefficients ``P``, and the
estimate of any ``f`` must be ``<H, P> / 2`` (``<T, P> / 24``) with torch.func's ``H`` (``T``):
an identity to rounding, whatever directions came. Unbiasedness is then a property of
``P`` alone: its mean over many directions is the exact operator's coefficients.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import (
    TOLERANCES,
    assert_same_tree,
    cast,
    exact_biharmonic,
    exact_laplacian,
    flat_reference,
    jet_reference,
)
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call, grad, hessian, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map

import hod

D = torch.float64


def mlp(x, W1, b1, W2, b2, w3):
    """A tanh network: ``x`` of shape ``(d,)`` gives a scalar, a batch ``(B, d)`` gives
    ``(B,)`` (rows independent)."""
    h = torch.tanh(x @ W1 + b1)
    h = torch.tanh(h @ W2 + b2)
    return h @ w3


def mlp_params(d: int, width: int = 6) -> tuple[torch.Tensor, ...]:
    return (torch.randn(d, width, dtype=D) / math.sqrt(d), torch.randn(width, dtype=D),
            torch.randn(width, width, dtype=D) / math.sqrt(width),
            torch.randn(width, dtype=D), torch.randn(width, dtype=D))


def field(x):
    """A vector field ``(d,) -> (2,)`` with mixed products, so that its Hessians are full."""
    return torch.stack([torch.sin(x).prod() + (x**3).sum(), torch.exp(0.3 * x).sum() * x[0]])


# -- jet ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3, 4, pytest.param(6, marks=pytest.mark.slow)])
def test_jet_of_a_network_along_a_direction_and_a_series(order):
    params = mlp_params(3)
    x = torch.randn(4, 3, dtype=D)
    jf = hod.jet(mlp, order)
    ref = jet_reference(mlp, order)
    for series in (torch.randn(4, 3, dtype=D),
                   tuple(torch.randn(4, 3, dtype=D) for _ in range(order))):
        assert_same_tree(jf((x, *params), series), ref((x, *params), series))


def test_the_jet_reference_is_faa_di_bruno_for_sin():
    """The suite's reference itself (conftest.jet_reference), against the closed form of
    ``sin(x(t))``'s first three derivatives."""
    x, s1, s2, s3 = (torch.randn(3, dtype=D) for _ in range(4))
    value, (c1, c2, c3) = jet_reference(torch.sin, 3)((x,), (s1, s2, s3))
    sin, cos = torch.sin(x), torch.cos(x)
    expected = (sin, (cos * s1, -sin * s1**2 + cos * s2,
                      -cos * s1**3 - 3 * sin * s1 * s2 + cos * s3))
    assert_same_tree((value, (c1, c2, c3)), expected)


def test_a_series_shorter_than_the_order_has_zero_higher_input_coefficients():
    x, s1, s2 = (torch.randn(3, dtype=D) for _ in range(3))
    actual = hod.jet(field, 4)((x,), (s1, s2))
    assert_same_tree(actual, jet_reference(field, 4)((x,), (s1, s2)))
    padded = (s1, s2, torch.zeros_like(x), torch.zeros_like(x))
    assert_same_tree(actual, jet_reference(field, 4)((x,), padded))


def test_a_one_term_series_is_the_direction():
    x, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    jf = hod.jet(field, 3)
    assert_same_tree(jf((x,), (v,)), jf((x,), v))


def test_jet_coefficients_are_derivatives_not_taylor_coefficients():
    """``c_k = d^k/dt^k f(x + t v)``: for ``exp`` along ``v`` that is ``exp(x) v^k``, with no
    ``1/k!``."""
    x, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    value, coefficients = hod.jet(torch.exp, 4)((x,), v)
    assert_same_tree(value, torch.exp(x))
    for k, c in enumerate(coefficients, start=1):
        assert_same_tree(c, torch.exp(x) * v**k)


def test_jet_with_argnums_tuple_mixing_a_direction_and_a_series():
    params = mlp_params(3)
    x = torch.randn(2, 3, dtype=D)
    series = (torch.randn(2, 3, dtype=D), tuple(torch.randn(3, 6, dtype=D) for _ in range(3)))
    actual = hod.jet(mlp, 3, argnums=(0, 1))((x, *params), series)
    assert_same_tree(actual, jet_reference(mlp, 3, (0, 1))((x, *params), series))


def dict_function(p):
    """A dict input and a dict output."""
    mixed = (p["w"][:2] * p["b"]).pow(2).sum()
    return {"sum": torch.sin(p["w"]).sum() * p["b"].exp().sum() + mixed,
            "vec": torch.tanh(p["w"]) * p["b"].sum()}


def dict_input():
    return {"w": torch.randn(3, dtype=D), "b": torch.randn(2, dtype=D)}


def test_jet_over_pytrees_a_direction_and_a_series_of_dicts():
    p = dict_input()
    jf, ref = hod.jet(dict_function, 3), jet_reference(dict_function, 3)
    for series in (dict_input(), (dict_input(), dict_input(), dict_input())):
        assert_same_tree(jf((p,), series), ref((p,), series))


def test_jet_under_vmap_over_directions():
    params, x = mlp_params(3), torch.randn(3, dtype=D)
    V = torch.randn(5, 3, dtype=D)
    actual = vmap(lambda v: hod.jet(mlp, 2)((x, *params), v)[1][1])(V)
    H = hessian(mlp)(x, *params)
    assert_same_tree(actual, torch.einsum("bi,ij,bj->b", V, H, V))


def test_jet_under_vmap_over_data_points():
    params = mlp_params(3)
    X, V = torch.randn(5, 3, dtype=D), torch.randn(5, 3, dtype=D)
    actual = vmap(lambda x, v: hod.jet(mlp, 3)((x, *params), v))(X, V)
    expected = vmap(lambda x, v: jet_reference(mlp, 3)((x, *params), v))(X, V)
    assert_same_tree(actual, expected)


def test_backward_through_jet_coefficients_reaches_parameters():
    params, x, v = mlp_params(3), torch.randn(3, dtype=D), torch.randn(3, dtype=D)

    def third(jet_of, *params):
        return jet_of(mlp, 3)((x, *params), v)[1][2]

    with_grad = [p.clone().requires_grad_() for p in params]
    actual = torch.autograd.grad(third(hod.jet, *with_grad), with_grad)
    expected = grad(lambda *ps: third(jet_reference, *ps), argnums=tuple(range(5)))(*params)
    assert_same_tree(actual, expected)


# -- hvp ------------------------------------------------------------------------------------------
def tanh_loss(x, W):
    return torch.tanh(x @ W).pow(2).sum() + (x**3).sum()


def test_hvp_equals_jvp_of_grad():
    x, W, v = torch.randn(4, 3, dtype=D), torch.randn(3, 2, dtype=D), torch.randn(4, 3, dtype=D)
    expected = jvp(lambda x: grad(tanh_loss)(x, W), (x,), (v,))[1]
    assert_same_tree(hod.hvp(tanh_loss)((x, W), v), expected)


def test_hvp_with_argnums_tuple():
    x, W = torch.randn(4, 3, dtype=D), torch.randn(3, 2, dtype=D)
    tangents = (torch.randn(4, 3, dtype=D), torch.randn(3, 2, dtype=D))
    expected = jvp(grad(tanh_loss, argnums=(0, 1)), (x, W), tangents)[1]
    assert_same_tree(hod.hvp(tanh_loss, argnums=(0, 1))((x, W), tangents), expected)


def test_hvp_of_a_dict_input():
    def scalar(p):
        return dict_function(p)["sum"]

    p, v = dict_input(), dict_input()
    assert_same_tree(hod.hvp(scalar)((p,), v), jvp(grad(scalar), (p,), (v,))[1])


def test_hvp_under_vmap_over_tangents():
    x, W = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D)
    V = torch.randn(4, 3, dtype=D)
    actual = vmap(lambda v: hod.hvp(tanh_loss)((x, W), v))(V)
    assert_same_tree(actual, V @ hessian(tanh_loss)(x, W))


# -- exact Laplacian ------------------------------------------------------------------------------
def test_laplacian_of_a_scalar_network():
    params, x = mlp_params(4), torch.randn(4, dtype=D)
    assert_same_tree(hod.laplacian(mlp)(x, *params), exact_laplacian(mlp, (x, *params)))


def test_laplacian_of_a_vector_field_is_per_output_entry():
    x = torch.randn(3, dtype=D)
    actual = hod.laplacian(field)(x)
    assert actual.shape == (2,)
    assert_same_tree(actual, exact_laplacian(field, (x,)))


def test_laplacian_of_a_batched_network_is_per_row():
    """The trace over all ``B * d`` input entries (the definition) is the per-row Laplacian,
    as the rows are independent."""
    params, X = mlp_params(3), torch.randn(5, 3, dtype=D)
    actual = hod.laplacian(mlp)(X, *params)
    assert actual.shape == (5,)
    assert_same_tree(actual, exact_laplacian(mlp, (X, *params)))
    per_row = vmap(lambda x: hessian(mlp)(x, *params).trace())(X)
    assert_same_tree(actual, per_row)


def test_laplacian_of_a_matrix_input_with_a_closure():
    params, X = mlp_params(3), torch.randn(2, 3, dtype=D)

    def net(X):
        return mlp(X, *params).prod()  # the rows interact: the Hessian has cross-row blocks

    assert_same_tree(hod.laplacian(net)(X), exact_laplacian(net, (X,)))


def _centered(X, *params):
    return mlp(X - X.mean(0), *params)


def _batch_normalized(X, *params):
    """Batch statistics from plain ops (torch.func's own batch_norm formulas are wrong at
    higher orders: tests/test_taylor_references.py)."""
    centered = X - X.mean(0)
    return mlp(centered / torch.sqrt((centered**2).mean(0) + 1e-5), *params)


def _gram(X, *params):
    return mlp(torch.tanh(X @ X.T)[:, :3], *params)


def _cumulative(X, *params):
    return mlp(X.cumsum(0) / 2, *params)


def _softmax_over_rows(X, *params):
    return mlp(torch.softmax(X, 0), *params)


ROWS_INTERACT = [_centered, _batch_normalized, _gram, _cumulative, _softmax_over_rows]


@pytest.mark.parametrize("f", ROWS_INTERACT, ids=lambda f: f.__name__.strip("_"))
def test_laplacian_of_a_batch_whose_rows_interact_is_the_full_trace(f):
    """One output per row, but the rows meet (batch statistics, ``X X^T``, a scan or a
    softmax over the batch): the Laplacian is the trace over all entries, not per row."""
    params, X = mlp_params(3), torch.randn(3, 3, dtype=D)
    diagonal = flat_reference(f, (X, *params), 2).diagonal(dim1=-2, dim2=-1).reshape(3, 3, 3)
    own_rows = torch.einsum("bbi->b", diagonal)
    full = diagonal.sum((-2, -1))
    assert not torch.allclose(full, own_rows), "the rows do not interact: a weak test"
    assert_same_tree(hod.laplacian(f)(X, *params), full)


@pytest.mark.parametrize("f", ROWS_INTERACT[:2], ids=lambda f: f.__name__.strip("_"))
def test_biharmonic_of_a_batch_whose_rows_interact(f):
    params, X = mlp_params(2), torch.randn(3, 2, dtype=D)
    assert_same_tree(hod.biharmonic(f)(X, *params), exact_biharmonic(f, (X, *params)),
                     rtol=1e-8, atol=1e-8)


def test_laplacian_with_argnums_tuple_sums_over_both_inputs():
    x, W = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D)
    actual = hod.laplacian(tanh_loss, argnums=(0, 1))(x, W)
    assert_same_tree(actual, exact_laplacian(tanh_loss, (x, W), (0, 1)))


def test_laplacian_of_a_dict_input():
    p = dict_input()
    assert_same_tree(hod.laplacian(dict_function)(p), exact_laplacian(dict_function, (p,)))


def test_laplacian_under_vmap_over_data_points():
    params, X = mlp_params(3), torch.randn(6, 3, dtype=D)
    actual = vmap(hod.laplacian(mlp), in_dims=(0, *[None] * 5))(X, *params)
    assert_same_tree(actual, vmap(lambda x: exact_laplacian(mlp, (x, *params)))(X))


def test_value_and_grad_come_with_the_laplacian():
    params, X = mlp_params(3), torch.randn(4, 3, dtype=D)
    u, gradient, lap = hod.laplacian(mlp, value_and_grad=True)(X, *params)
    assert_same_tree(u, mlp(X, *params))
    assert_same_tree(gradient, hod.jacobian(mlp)(X, *params))
    assert_same_tree(gradient, torch.func.jacrev(mlp)(X, *params))
    assert_same_tree(lap, exact_laplacian(mlp, (X, *params)))


# -- weighted second-order operators --------------------------------------------------------------
def weighted(f, args: tuple, C: torch.Tensor, argnums=0) -> torch.Tensor:
    """``sum_ij C_ij d2f/dx_i dx_j`` from torch.func's Hessian, per output entry."""
    return (flat_reference(f, args, 2, argnums) * C).sum((-2, -1))


def test_laplacian_with_a_weight_matrix():
    x = torch.randn(3, dtype=D)
    A = torch.randn(3, 3, dtype=D)
    C = A @ A.T  # a diffusion matrix: symmetric positive semi-definite
    assert_same_tree(hod.laplacian(field, weights=C)(x), weighted(field, (x,), C))


def test_laplacian_with_an_indefinite_nonsymmetric_weight_matrix():
    """Only ``C``'s symmetric part meets the symmetric Hessian; any ``C`` is allowed."""
    x = torch.randn(3, dtype=D)
    C = torch.randn(3, 3, dtype=D)
    assert_same_tree(hod.laplacian(field, weights=C)(x), weighted(field, (x,), C))


def test_laplacian_with_weights_that_depend_on_the_input():
    params = mlp_params(2)

    def diffusion(x, *params):
        """Black-Scholes-like: ``C(x) = diag(sigma x) R diag(sigma x)``."""
        sx = torch.tensor([0.3, 0.5], dtype=D) * x
        R = torch.tensor([[1.0, 0.4], [0.4, 1.0]], dtype=D)
        return sx[:, None] * R * sx[None, :]

    x = torch.randn(2, dtype=D)
    actual = hod.laplacian(mlp, weights=diffusion)(x, *params)
    assert_same_tree(actual, weighted(mlp, (x, *params), diffusion(x, *params)))


def test_laplacian_with_weights_over_two_arguments():
    """``D`` counts the entries of both arguments, flattened in positional order."""
    x, W = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D)
    A = torch.randn(9, 9, dtype=D)
    C = A @ A.T
    actual = hod.laplacian(tanh_loss, argnums=(0, 1), weights=C)(x, W)
    assert_same_tree(actual, weighted(tanh_loss, (x, W), C, (0, 1)))


def test_laplacian_with_weights_under_vmap_over_data_points():
    params, X = mlp_params(3), torch.randn(4, 3, dtype=D)
    A = torch.randn(3, 3, dtype=D)
    C = A @ A.T
    actual = vmap(hod.laplacian(mlp, weights=C), in_dims=(0, *[None] * 5))(X, *params)
    assert_same_tree(actual, vmap(lambda x: weighted(mlp, (x, *params), C))(X))


# -- stochastic Laplacian -------------------------------------------------------------------------
def outer(x):
    """The Laplacian probe ``x_a x_b``, shape ``(n, n)`` (n = numel of x)."""
    z = x.reshape(-1)
    return z[:, None] * z[None, :]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_stochastic_laplacian_is_the_hessian_contracted_with_the_directions_drawn(distribution):
    params, x = mlp_params(4), torch.randn(4, dtype=D)
    estimate = hod.laplacian(mlp, samples=3, distribution=distribution, generator=seeded(7))
    probe = hod.laplacian(outer, samples=3, distribution=distribution, generator=seeded(7))
    P = probe(x)
    H = flat_reference(mlp, (x, *params), 2)
    assert_same_tree(estimate(x, *params), (H * P).sum() / 2)
    assert not torch.allclose(estimate(x, *params), exact_laplacian(mlp, (x, *params))), (
        "three directions gave the exact Laplacian: is the estimate random at all?")


def test_rademacher_directions_read_back_exactly_one_on_the_diagonal():
    P = hod.laplacian(outer, samples=5, generator=seeded(3))(torch.randn(6, dtype=D))
    assert_same_tree(P.diagonal() / 2, torch.ones(6, dtype=D))
    off = P / 2 - torch.eye(6, dtype=D)
    assert off.abs().max() > 0.1, "5 Rademacher directions averaged to the identity"


@pytest.mark.parametrize("distribution, diagonal_variance",
                         [("rademacher", 0.0), ("normal", 2.0)])
def test_stochastic_laplacian_is_unbiased(distribution, diagonal_variance):
    """``P / 2`` is the mean of ``v v^T`` over the directions; its expectation is the
    identity. Off the diagonal each entry has variance 1 per direction, on it
    ``diagonal_variance``: the mean of S draws is within 5 standard errors of it (a
    biased or mis-scaled estimator misses by far more: S = 20000 puts 5 errors at 0.035)."""
    S, n = 20000, 4
    P = hod.laplacian(outer, samples=S, distribution=distribution, generator=seeded(11))(
        torch.randn(n, dtype=D))
    error = P / 2 - torch.eye(n, dtype=D)
    off_diagonal = error[~torch.eye(n, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 5 / math.sqrt(S)
    assert error.diagonal().abs().max() <= 5 * math.sqrt(diagonal_variance / S) + 1e-12


def test_stochastic_laplacian_over_many_directions_approaches_the_exact_one():
    params, x = mlp_params(3), torch.randn(3, dtype=D)
    exact = exact_laplacian(mlp, (x, *params))
    H = flat_reference(mlp, (x, *params), 2)
    off = H - torch.diag(H.diagonal())
    S = 20000
    standard_error = math.sqrt(2 * float((off**2).sum()) / S)  # Rademacher: 2 sum_{i!=j} H_ij^2
    estimate = hod.laplacian(mlp, samples=S, generator=seeded(5))(x, *params)
    assert abs(float(estimate - exact)) < 5 * standard_error
    assert 5 * standard_error < 0.1 * abs(float(exact)), "the check could not tell a bias"


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_stochastic_laplacian_under_vmap_over_data_points(randomness):
    """``randomness="same"``: every point sees the same directions; ``"different"``: each its
    own, read back per point by the probe under the same vmap and seed."""
    params, X = mlp_params(3), torch.randn(4, 3, dtype=D)

    def batched(f, *rest):
        estimate = hod.laplacian(f, samples=3, generator=seeded(3))
        return vmap(estimate, in_dims=(0, *[None] * len(rest)), randomness=randomness)(X, *rest)

    P = batched(outer)
    H = vmap(lambda x: flat_reference(mlp, (x, *params), 2))(X)
    assert_same_tree(batched(mlp, *params), (H * P).sum((-2, -1)) / 2)
    assert torch.equal(P[0], P[1]) == (randomness == "same")


def test_stochastic_laplacian_over_two_arguments():
    x, W = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D)

    def probe(x, W):
        return outer(torch.cat([x.reshape(-1), W.reshape(-1)]))

    estimate = hod.laplacian(tanh_loss, argnums=(0, 1), samples=3, generator=seeded(4))(x, W)
    P = hod.laplacian(probe, argnums=(0, 1), samples=3, generator=seeded(4))(x, W)
    H = flat_reference(tanh_loss, (x, W), 2, (0, 1))
    assert_same_tree(estimate, (H * P).sum() / 2)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_stochastic_laplacian_is_reproducible_with_a_generator_and_fresh_per_call(distribution):
    """Rademacher directions in 8 dimensions: two draws of 4 coincide with probability
    below 1e-8 (normal ones with probability 0)."""
    params, x = mlp_params(8), torch.randn(8, dtype=D)
    first = hod.laplacian(mlp, samples=4, distribution=distribution, generator=seeded(1))
    again = hod.laplacian(mlp, samples=4, distribution=distribution, generator=seeded(1))
    other = hod.laplacian(mlp, samples=4, distribution=distribution, generator=seeded(2))
    a = first(x, *params)
    assert torch.equal(a, again(x, *params))
    assert not torch.equal(a, other(x, *params))
    assert not torch.equal(a, first(x, *params)), "a second call drew the same directions"


def test_stochastic_laplacian_without_a_generator_follows_the_global_seed():
    params, x = mlp_params(3), torch.randn(3, dtype=D)
    lap = hod.laplacian(mlp, samples=2, distribution="normal")
    torch.manual_seed(4)
    a = lap(x, *params)
    torch.manual_seed(4)
    assert torch.equal(a, lap(x, *params))


def test_stochastic_laplacian_of_a_batched_network_is_per_row_and_unbiased():
    """Per row: the probe of the flat batch reads the directions of all ``B * d`` entries;
    the estimate is the Hessian (block diagonal over rows) contracted with them."""
    params, X = mlp_params(2), torch.randn(3, 2, dtype=D)
    estimate = hod.laplacian(mlp, samples=4, generator=seeded(9))(X, *params)
    P = hod.laplacian(outer, samples=4, generator=seeded(9))(X)
    H = flat_reference(mlp, (X, *params), 2)
    assert_same_tree(estimate, (H * P).sum((-2, -1)) / 2)


# -- biharmonic -----------------------------------------------------------------------------------
def test_exact_biharmonic_of_a_network():
    params, x = mlp_params(3), torch.randn(3, dtype=D)
    assert_same_tree(hod.biharmonic(mlp)(x, *params), exact_biharmonic(mlp, (x, *params)))


def test_exact_biharmonic_of_a_vector_field():
    x = torch.randn(3, dtype=D)
    assert_same_tree(hod.biharmonic(field)(x), exact_biharmonic(field, (x,)))


def test_exact_biharmonic_of_a_batched_network_is_per_row():
    params, X = mlp_params(2), torch.randn(3, 2, dtype=D)
    actual = hod.biharmonic(mlp)(X, *params)
    assert actual.shape == (3,)
    assert_same_tree(actual, exact_biharmonic(mlp, (X, *params)))


def test_exact_biharmonic_over_two_arguments():
    x, W = torch.randn(2, dtype=D), torch.randn(2, 1, dtype=D)
    actual = hod.biharmonic(tanh_loss, argnums=(0, 1))(x, W)
    assert_same_tree(actual, exact_biharmonic(tanh_loss, (x, W), (0, 1)))


def test_exact_biharmonic_under_vmap_over_data_points():
    params, X = mlp_params(2), torch.randn(3, 2, dtype=D)
    actual = vmap(hod.biharmonic(mlp), in_dims=(0, *[None] * 5))(X, *params)
    assert_same_tree(actual, vmap(lambda x: exact_biharmonic(mlp, (x, *params)))(X))


def fourth_power(x):
    """The biharmonic probe ``x_a x_b x_c x_d``, shape ``(n,) * 4``."""
    z = x.reshape(-1)
    return torch.einsum("a,b,c,d->abcd", z, z, z, z)


def biharmonic_coefficients(n: int) -> torch.Tensor:
    """The symmetrized coefficients of ``sum_ij T_iijj``:
    ``(d_ab d_cd + d_ac d_bd + d_ad d_bc) / 3``."""
    eye = torch.eye(n, dtype=D)
    return (torch.einsum("ab,cd->abcd", eye, eye) + torch.einsum("ac,bd->abcd", eye, eye)
            + torch.einsum("ad,bc->abcd", eye, eye)) / 3


def test_stochastic_biharmonic_is_the_fourth_derivative_contracted_with_the_directions():
    params, x = mlp_params(3), torch.randn(3, dtype=D)
    estimate = hod.biharmonic(mlp, samples=3, generator=seeded(2))(x, *params)
    P = hod.biharmonic(fourth_power, samples=3, generator=seeded(2))(x)
    T = flat_reference(mlp, (x, *params), 4)
    assert_same_tree(estimate, (T * P).sum() / 24)
    assert not torch.allclose(estimate, exact_biharmonic(mlp, (x, *params)))


def test_stochastic_biharmonic_is_unbiased():
    """The coefficients read back from the probe average to the biharmonic's. With normal
    directions and the estimate ``T[v, v, v, v] / 3`` an entry's standard deviation is at most
    ``sqrt(96) / 3`` per direction; over S = 20000, 5 standard errors are 0.12, while a wrong
    scale (1 or 3 in place of 1/3 off the diagonal) misses by 0.67 or more."""
    S, n = 20000, 2
    P = hod.biharmonic(fourth_power, samples=S, generator=seeded(13))(torch.randn(n, dtype=D))
    error = P / 24 - biharmonic_coefficients(n)
    assert error.abs().max() < 5 * math.sqrt(96) / 3 / math.sqrt(S)


def test_stochastic_biharmonic_is_reproducible_with_a_generator():
    params, x = mlp_params(2), torch.randn(2, dtype=D)
    a = hod.biharmonic(mlp, samples=2, generator=seeded(1))(x, *params)
    assert torch.equal(a, hod.biharmonic(mlp, samples=2, generator=seeded(1))(x, *params))
    assert not torch.equal(a, hod.biharmonic(mlp, samples=2, generator=seeded(2))(x, *params))


# -- operator -------------------------------------------------------------------------------------
def operator_reference(f, args: tuple, terms: dict, argnums=0) -> torch.Tensor:
    """``sum c_alpha d^alpha f`` from torch.func's derivative tensors over the flat input."""
    total = 0
    for alpha, c in terms.items():
        total = total + c * flat_reference(f, args, len(alpha), argnums)[(..., *alpha)]
    return total


HEAT = {(0, 0): 1.0, (1,): -2.0}
MIXED = {(0, 1, 2): 0.5, (0, 0, 1, 1): 1.5, (2, 2, 2, 2): -1.0, (1, 1): 0.25, (2,): 3.0,
         (2, 0, 1, 0): 0.75}
REPEATED = {(1, 0): 2.0, (0, 1): 1.0, (2, 1, 1): -0.5, (1, 2, 1): 0.5, (1, 1, 2): 1.0}


@pytest.mark.parametrize("terms", [HEAT, MIXED, REPEATED], ids=["heat", "mixed", "repeated"])
def test_operator_on_a_network(terms):
    params, x = mlp_params(3), torch.randn(3, dtype=D)
    actual = hod.operator(mlp, terms)(x, *params)
    assert_same_tree(actual, operator_reference(mlp, (x, *params), terms))


def test_operator_on_a_vector_field_and_a_matrix_input():
    """Flat positions of a ``(2, 2)`` input are row-major."""
    def f(X):
        return field(X.reshape(-1)[:3]) * X[1, 1].exp()

    X = torch.randn(2, 2, dtype=D)
    terms = {(3, 0): 1.0, (0, 1, 3): -1.0, (3, 3, 3, 2): 0.5, (1,): 2.0}
    assert_same_tree(hod.operator(f, terms)(X), operator_reference(f, (X,), terms))


def test_operator_over_two_arguments_counts_positions_across_them():
    x, W = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D)
    terms = {(0, 4): 1.0, (4, 4, 8): -0.5, (2,): 1.5, (1, 1, 6, 6): 0.25}
    actual = hod.operator(tanh_loss, terms, argnums=(0, 1))(x, W)
    assert_same_tree(actual, operator_reference(tanh_loss, (x, W), terms, (0, 1)))


def test_operator_under_vmap_over_data_points():
    params, X = mlp_params(3), torch.randn(4, 3, dtype=D)
    actual = vmap(hod.operator(mlp, MIXED), in_dims=(0, *[None] * 5))(X, *params)
    assert_same_tree(actual, vmap(lambda x: operator_reference(mlp, (x, *params), MIXED))(X))


def test_operator_of_the_laplacian_terms_is_the_laplacian():
    params, x = mlp_params(3), torch.randn(3, dtype=D)
    terms = {(i, i): 1.0 for i in range(3)}
    assert_same_tree(hod.operator(mlp, terms)(x, *params), hod.laplacian(mlp)(x, *params))


# -- autograd: a PINN loss trains a network -------------------------------------------------------
def pinn():
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(D)
    X = torch.rand(16, 2, dtype=D)
    rhs = -2 * math.pi**2 * torch.sin(math.pi * X).prod(-1)  # Poisson: the Laplacian's target
    return model, X, rhs


def pinn_loss_reference(model, X, rhs):
    """The same loss from torch.func: per-point Hessian traces of ``functional_call``."""
    def u(p, x):
        return functional_call(model, p, (x,)).squeeze(-1)

    def loss(p, X):
        lap = vmap(lambda x: hessian(u, argnums=1)(p, x).trace())(X)
        return ((lap - rhs) ** 2).mean()

    return loss


def test_pinn_loss_gradient_reaches_parameters_and_inputs_as_torch_funcs():
    model, X, rhs = pinn()
    params = dict(model.named_parameters())
    X_hod = X.clone().requires_grad_()
    lap = hod.laplacian(lambda X: model(X).squeeze(-1))
    loss = ((lap(X_hod) - rhs) ** 2).mean()
    # the last bias does not reach the Laplacian: its gradient is zero
    actual = torch.autograd.grad(loss, [*params.values(), X_hod], materialize_grads=True)
    detached = {k: v.detach() for k, v in params.items()}
    loss_ref = pinn_loss_reference(model, X, rhs)
    expected = grad(loss_ref, argnums=(0, 1))(detached, X)
    assert_same_tree(loss.detach(), loss_ref(detached, X))
    assert_same_tree(list(actual), [*expected[0].values(), expected[1]])


def test_pinn_loss_on_the_laplacian_trains_the_network():
    model, X, rhs = pinn()
    lap = hod.laplacian(lambda X: model(X).squeeze(-1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = ((lap(X) - rhs) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    detached = {k: v.detach() for k, v in model.named_parameters()}
    final = float(pinn_loss_reference(model, X, rhs)(detached, X))
    assert final < 0.2 * losses[0], f"the loss went from {losses[0]} to {final}"


def test_pinn_residual_from_value_gradient_and_laplacian_backpropagates():
    """A residual using ``u``, ``grad u`` and ``laplacian u`` from one call. The gradient is
    ``hod.jacobian``'s, ``(B, B, 2)`` for a batch: each row's own is on its diagonal."""
    model, X, rhs = pinn()
    params = dict(model.named_parameters())

    def u(X):
        return model(X).squeeze(-1)

    value, jacobian, lap = hod.laplacian(u, value_and_grad=True)(X)
    gradient = torch.einsum("bbi->bi", jacobian)
    loss = ((lap + gradient.sum(-1) * value - rhs) ** 2).mean()
    actual = torch.autograd.grad(loss, list(params.values()))

    def loss_ref(p):
        def u_of(x):
            return functional_call(model, p, (x,)).squeeze(-1)

        lap = vmap(lambda x: hessian(u_of)(x).trace())(X)
        gradient = vmap(grad(u_of))(X)
        return ((lap + gradient.sum(-1) * u_of(X) - rhs) ** 2).mean()

    expected = grad(loss_ref)({k: v.detach() for k, v in params.items()})
    assert_same_tree(list(actual), list(expected.values()))


def test_torch_func_grad_of_hvp_and_laplacian_results():
    """Inside torch.func transforms, with the parameters passed as arguments."""
    x, W, v = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D), torch.randn(3, dtype=D)

    def hvp_loss(hvp_of, W):
        return hvp_of(W).pow(2).sum()

    actual = grad(lambda W: hvp_loss(lambda W: hod.hvp(tanh_loss)((x, W), v), W))(W)
    expected = grad(lambda W: hvp_loss(
        lambda W: jvp(lambda x: grad(tanh_loss)(x, W), (x,), (v,))[1], W))(W)
    assert_same_tree(actual, expected)
    actual = torch.func.jacrev(lambda W: hod.laplacian(tanh_loss)(x, W))(W)
    assert_same_tree(actual, torch.func.jacrev(lambda W: hessian(tanh_loss)(x, W).trace())(W))


def test_backward_through_biharmonic_and_operator_reaches_parameters():
    params, x = mlp_params(2), torch.randn(2, dtype=D)
    terms = {(0, 0, 1): 1.0, (1,): 0.5}

    def both(biharmonic, operator, *params):
        return biharmonic(mlp)(x, *params) + operator(mlp, terms)(x, *params)

    with_grad = [p.clone().requires_grad_() for p in params]
    actual = torch.autograd.grad(both(hod.biharmonic, hod.operator, *with_grad), with_grad)

    def reference_biharmonic(f):
        return lambda x, *params: exact_biharmonic(f, (x, *params))

    def reference_operator(f, terms):
        return lambda x, *params: operator_reference(f, (x, *params), terms)

    expected = grad(lambda *ps: both(reference_biharmonic, reference_operator, *ps),
                    argnums=tuple(range(5)))(*params)
    assert_same_tree(list(actual), list(expected))


# -- float32 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["jet", "hvp", "laplacian", "biharmonic", "operator"])
def test_float32_results_keep_the_dtype_and_match_float64(name):
    params, x, v = mlp_params(3), torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    args = (x, *params)
    compute, expected = {
        "jet": (lambda a: hod.jet(mlp, 3)(a, v.float()), jet_reference(mlp, 3)(args, v)),
        "hvp": (lambda a: hod.hvp(mlp)(a, v.float()),
                jvp(lambda x: grad(mlp)(x, *params), (x,), (v,))[1]),
        "laplacian": (lambda a: hod.laplacian(mlp)(*a), exact_laplacian(mlp, args)),
        "biharmonic": (lambda a: hod.biharmonic(mlp)(*a), exact_biharmonic(mlp, args)),
        "operator": (lambda a: hod.operator(mlp, MIXED)(*a),
                     operator_reference(mlp, args, MIXED)),
    }[name]
    rtol, atol = TOLERANCES[torch.float32]
    assert_same_tree(compute(cast(args, torch.float32)), cast(expected, torch.float32),
                     rtol=rtol, atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_taylor_results_stay_on_a_cuda_device():
    params, X, v = mlp_params(3), torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    on_cpu = (hod.jet(mlp, 3)((X, *params), v), hod.laplacian(mlp)(X, *params),
              hod.biharmonic(mlp)(X, *params))
    X_cuda, *params_cuda, v_cuda = (t.cuda() for t in (X, *params, v))
    on_cuda = (hod.jet(mlp, 3)((X_cuda, *params_cuda), v_cuda),
               hod.laplacian(mlp)(X_cuda, *params_cuda), hod.biharmonic(mlp)(X_cuda, *params_cuda))
    assert all(t.device.type == "cuda" for t in tree_flatten(on_cuda)[0])
    assert_same_tree(tree_map(lambda t: t.cpu(), on_cuda), on_cpu, rtol=1e-8, atol=1e-8)


# -- torch.compile and the generated code ---------------------------------------------------------
def test_torch_compile_of_taylor_functions():
    params, X = mlp_params(3), torch.randn(4, 3, dtype=D)
    x, W, v = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D), torch.randn(3, dtype=D)
    counter = CompileCounterWithBackend("aot_eager")
    lap = torch.compile(hod.laplacian(mlp), backend=counter)
    assert_same_tree(lap(X, *params), exact_laplacian(mlp, (X, *params)))
    hvp = torch.compile(hod.hvp(tanh_loss), backend=counter)
    assert_same_tree(hvp((x, W), v), jvp(lambda x: grad(tanh_loss)(x, W), (x,), (v,))[1])
    assert counter.frame_count >= 2 and counter.op_count > 10


def test_compile_option_of_jet_laplacian_and_biharmonic():
    params, x, v = mlp_params(3), torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    options = {"backend": "aot_eager"}
    jf = hod.jet(mlp, 3, compile=options)
    assert_same_tree(jf((x, *params), v), jet_reference(mlp, 3)((x, *params), v))
    assert_same_tree(hod.laplacian(mlp, compile=options)(x, *params),
                     exact_laplacian(mlp, (x, *params)))
    assert_same_tree(hod.biharmonic(mlp, compile=options)(x, *params),
                     exact_biharmonic(mlp, (x, *params)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_inductor_compiles_a_laplacian():
    params, X = mlp_params(3), torch.randn(4, 3, dtype=D)
    lap = torch.compile(hod.laplacian(mlp))
    assert_same_tree(lap(X, *params), exact_laplacian(mlp, (X, *params)))


@pytest.mark.parametrize("name", ["jet", "hvp", "laplacian", "biharmonic", "operator"])
def test_lowered_code_is_a_string_of_torch_calls(name):
    params, x, v = mlp_params(3), torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    lowered = {
        "jet": lambda: hod.jet(mlp, 2).lower((x, *params), v),
        "hvp": lambda: hod.hvp(mlp).lower((x, *params), v),
        "laplacian": lambda: hod.laplacian(mlp).lower(x, *params),
        "biharmonic": lambda: hod.biharmonic(mlp).lower(x, *params),
        "operator": lambda: hod.operator(mlp, HEAT).lower(x, *params),
    }[name]()
    code = lowered.code
    assert isinstance(code, str) and "def forward" in code
    assert "torch.tanh(" in code, code


def test_taylor_functions_are_generated_once_per_signature():
    params = mlp_params(3)
    lap, jf = hod.laplacian(mlp), hod.jet(mlp, 2)
    x, y, v = (torch.randn(3, dtype=D) for _ in range(3))
    assert lap.lower(x, *params) is lap.lower(y, *params)
    assert lap.lower(x, *params) is not lap.lower(torch.randn(2, 3, dtype=D), *params)
    assert jf.lower((x, *params), v) is jf.lower((y, *params), x)
    assert jf.lower((x, *params), v) is not jf.lower((x, *params), (v, v))
