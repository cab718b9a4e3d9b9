"""A first linear layer split off (hod._split): f(X, W, ...) = g(X @ W, ...), with g's
derivatives composed into f's. Values against nested torch.func in float64, order by
order; most tests lower the size thresholds so that small cases take the split."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_tree, reference
from models import weighted_seed_mlp

import hod
import hod._split

D = torch.float64


@pytest.fixture
def always_split(monkeypatch):
    monkeypatch.setattr(hod._split, "SPLIT_MIN_ENTRIES", 0)
    monkeypatch.setattr(hod._split, "SPLIT_MIN_ENTRIES_HESSIAN", 0)


def mlp(x, w1, b1, w2):
    return torch.tanh(torch.tanh(x @ w1 + b1) @ w2).sum()


def _mlp_inputs(batch=3, width=4, out=2):
    return (torch.randn(batch, width, dtype=D), torch.randn(width, width, dtype=D) / 2,
            torch.randn(width, dtype=D), torch.randn(width, out, dtype=D))


def _check(f, order, argnums, args, split=True, **kwargs):
    fn = hod.derivative(f, order, argnums, **kwargs)
    assert (fn.lower(*args).first_layer is not None) == split
    assert_same_tree(fn(*args), reference(f, order, argnums)(*args))


ARGNUMS = [(0, 1, 2, 3), (1, 3), (3, 1, 0), (1, 0), 1, (0, 1), (2, 1)]


@pytest.mark.parametrize("argnums", ARGNUMS)
@pytest.mark.parametrize("order", [2, 3])
def test_split_equals_torch_func(always_split, order, argnums):
    _check(mlp, order, argnums, _mlp_inputs())


@pytest.mark.slow
@pytest.mark.parametrize("argnums", ARGNUMS)
def test_split_equals_torch_func_order_4(always_split, argnums):
    _check(mlp, 4, argnums, _mlp_inputs(batch=2, width=3))


def test_rows_that_interact_take_the_dense_composition(always_split):
    """A softmax across the batch couples the rows of X @ W: g's blocks are dense."""

    def coupled(x, w, v):
        return (torch.softmax(x @ w, dim=0) * v).pow(2).sum()

    x, w, v = torch.randn(3, 4, dtype=D), torch.randn(4, 2, dtype=D), torch.randn(3, 2, dtype=D)
    for order in (2, 3):
        _check(coupled, order, (0, 1, 2), (x, w, v))


def test_vector_outputs(always_split):
    """A value per example (g is derived in forward mode) and a matrix output."""

    def per_example(x, w, v):
        return torch.tanh(x @ w) @ v

    def matrix(x, w):
        return torch.sin(x @ w)

    x, w, v = torch.randn(3, 4, dtype=D), torch.randn(4, 2, dtype=D), torch.randn(2, dtype=D)
    for order in (2, 3):
        _check(per_example, order, (0, 1, 2), (x, w, v))
        _check(matrix, order, (1, 0), (x, w))


def test_derivatives_returns_every_order(always_split):
    args = _mlp_inputs()
    got = hod.derivatives(mlp, 3, (0, 1, 3))(*args)
    assert_same_tree(got[0], mlp(*args))
    for order in (1, 2, 3):
        assert_same_tree(got[order], reference(mlp, order, (0, 1, 3))(*args))


def test_under_vmap_and_autograd(always_split):
    """Per-example Hessians under vmap, and the general code under autograd."""
    x, w1, b1, w2 = _mlp_inputs()
    xs = torch.randn(5, 3, 4, dtype=D)
    fn = hod.hessian(mlp, (0, 1))
    got = torch.func.vmap(fn, in_dims=(0, None, None, None))(xs, w1, b1, w2)
    expected = torch.func.vmap(reference(mlp, 2, (0, 1)), in_dims=(0, None, None, None))(
        xs, w1, b1, w2)
    assert_same_tree(got, expected)
    w1 = w1.clone().requires_grad_()
    got = fn(x, w1, b1, w2)
    assert got[1][1].requires_grad
    assert_same_tree(tuple(tuple(b.detach() for b in row) for row in got),
                     reference(mlp, 2, (0, 1))(x, w1.detach(), b1, w2))


def test_the_width_8_mlp_splits_at_its_own_size():
    """Order 3 of the benchmark's width-8 MLP with its weights: g's seeds are h's 8 per
    example and the last weight's 64, against 8 + 64 + 64 without the split."""

    x, w1, w2 = torch.rand(4, 8, dtype=D), torch.rand(8, 8, dtype=D), torch.rand(8, 8, dtype=D)
    fn = hod.derivative(weighted_seed_mlp, 3, (0, 1, 2))
    lowered = fn.lower(x, w1, w2)
    assert lowered.first_layer is not None and lowered.seed_size == 8 + 64
    assert_same_tree(fn(x, w1, w2), reference(weighted_seed_mlp, 3, (0, 1, 2))(x, w1, w2))


def test_small_cases_are_not_split():
    """Below the thresholds the composition's calls cost more than the split saves."""
    _check(mlp, 3, (0, 1, 3), _mlp_inputs(batch=2), split=False)
    _check(mlp, 2, (0, 1), _mlp_inputs(batch=2, width=2), split=False)


def test_what_is_not_split(always_split):
    """Order 1, aux outputs, an X read elsewhere, a W read twice, an X computed first."""
    x, w1, b1, w2 = _mlp_inputs()
    _check(mlp, 1, (0, 1), (x, w1, b1, w2), split=False)
    _check(lambda x, w: (x @ w).pow(3).sum() + x.sum(), 2, (0, 1), (x, w1), split=False)
    _check(lambda x, w: (x @ w).pow(3).sum() + w.pow(2).sum(), 2, (0, 1), (x, w1),
           split=False)
    _check(lambda x, w: ((2 * x) @ w).pow(3).sum(), 2, (0, 1), (x, w1), split=False)
    _check(lambda x, w: (x @ torch.pow(2.0, w)).pow(3).sum(), 2, (0, 1), (x, w1),
           split=False)  # W's one reader takes a number first

    def with_aux(x, w):
        return (x @ w).pow(3).sum(), x.sum()

    fn = hod.derivative(with_aux, 2, (0, 1), has_aux=True)
    assert fn.lower(x, w1).first_layer is None
    got, aux = fn(x, w1)
    assert_same_tree(aux, x.sum())
    assert_same_tree(got, reference(with_aux, 2, (0, 1), has_aux=True)(x, w1)[0])


def test_only_the_weight_differentiated(always_split):
    """X is a constant: only W's slots, contracted with X."""
    x, w1, b1, w2 = _mlp_inputs()
    _check(mlp, 3, (1,), (x, w1, b1, w2))
    _check(mlp, 2, 1, (x, w1, b1, w2))


def test_an_error_names_the_line_of_f(always_split):
    """g is a traced graph: an unsupported op is reported from f's source, not g's."""

    def zeta_layer(x, w):
        return torch.special.zeta(x @ w + 1.0, 2.0).sum()

    x, w = torch.rand(3, 4, dtype=D), torch.rand(4, 2, dtype=D)
    with pytest.raises(hod.UnsupportedOperatorError, match=r"torch\.special\.zeta\(x @ w"):
        hod.hessian(zeta_layer, (0, 1))(x, w)


def linear_mlp(x, w1, b1, w2):
    """torch.nn.Linear's layout: weights (out, in), read transposed, with a bias."""
    hidden = torch.tanh(torch.nn.functional.linear(x, w1, b1))
    return torch.nn.functional.linear(hidden, w2).sin().sum()


@pytest.mark.parametrize("argnums", [(0, 1, 2, 3), (1, 2), (2, 1, 0), (1, 0, 3)])
@pytest.mark.parametrize("order", [2, 3])
def test_linear_layers_split(always_split, order, argnums):
    x, w1, b1 = torch.randn(3, 4, dtype=D), torch.randn(5, 4, dtype=D), torch.randn(5, dtype=D)
    _check(linear_mlp, order, argnums, (x, w1, b1, torch.randn(2, 5, dtype=D)))


def test_other_spellings_of_a_layer(always_split):
    """``x @ w.T``, ``x @ w.transpose(0, 1) + b`` and ``torch.addmm(b, x, w)``."""
    x, w, b = torch.randn(3, 4, dtype=D), torch.randn(4, 4, dtype=D), torch.randn(4, dtype=D)
    spellings = [
        lambda x, w, b: torch.tanh(x @ w.T + b).pow(2).sum(),
        lambda x, w, b: torch.tanh(x @ w.transpose(0, 1) + b).pow(2).sum(),
        lambda x, w, b: torch.tanh(torch.addmm(b, x, w)).pow(2).sum(),
    ]
    for f in spellings:
        for order in (2, 3):
            _check(f, order, (0, 1, 2), (x, w, b))


DATA = torch.randn(6, 4, dtype=D, generator=torch.Generator().manual_seed(3))
LABELS = torch.tensor([0, 2, 1, 2, 0, 1])


def softmax_regression(w, b):
    """Captured data times a flat weight vector viewed as (features, classes)."""
    return torch.nn.functional.cross_entropy(DATA.to(w) @ w.view(4, 3) + b, LABELS)


def linear_regression(w, b):
    """torch.nn.Linear's layout on captured data: a (2, 6) weight viewed as (3, 4)."""
    return torch.nn.functional.linear(DATA.to(w), w.reshape(3, 4), b).tanh().pow(2).sum()


@pytest.mark.parametrize("f,w_shape", [(softmax_regression, (12,)),
                                       (linear_regression, (2, 6))])
@pytest.mark.parametrize("argnums", [0, (0, 1), (1, 0)])
@pytest.mark.parametrize("order", [2, 3])
def test_captured_data_and_viewed_weights(always_split, f, w_shape, argnums, order):
    """X captured by f (a constant of the trace) and W a view of a leaf of another shape:
    the blocks come back in the leaf's shape."""
    w, b = torch.randn(w_shape, dtype=D) / 2, torch.randn(3, dtype=D)
    _check(f, order, argnums, (w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_regression_splits_at_its_own_size(dtype):
    """A Newton Hessian of softmax regression (500 samples, 20 features, 10 classes) takes
    the split without lowered thresholds, in float32 too."""
    data = torch.randn(500, 20, dtype=dtype)
    labels = torch.randint(0, 10, (500,))

    def loss(w):
        return torch.nn.functional.cross_entropy(data @ w.view(20, 10), labels)

    w = 0.1 * torch.randn(200, dtype=dtype)
    fn = hod.hessian(loss)
    assert fn.lower(w).first_layer is not None
    torch.testing.assert_close(fn(w), torch.func.hessian(loss)(w))


def test_a_viewed_weight_read_twice_is_not_split(always_split):
    w, b = torch.randn(12, dtype=D), torch.randn(3, dtype=D)
    _check(lambda w, b: softmax_regression(w, b) + w.pow(3).sum(), 2, (0, 1), (w, b),
           split=False)
