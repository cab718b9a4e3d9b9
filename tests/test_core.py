"""hod.derivative against nested torch.func in float64, orders 1-4."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, reference
from models import broadcasting, seed_mlp, tanh_mlp, vector_valued, weighted_seed_mlp
from torch.func import functional_call

import hod

D = torch.float64
ORDERS = [1, 2, 3, 4]


def mlp_inputs(batch=3, width=4, depth=3):
    X = torch.rand(batch, width, dtype=D)
    return X, *[torch.randn(width, width, dtype=D) for _ in range(depth)]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("argnums", [0, (0, 1, 2, 3)], ids=["x", "x+params"])
def test_weighted_seed_mlp(order, argnums):
    args = mlp_inputs()
    actual = hod.derivative(weighted_seed_mlp, order, argnums)(*args)
    assert_same_tree(actual, reference(weighted_seed_mlp, order, argnums)(*args))


def test_the_seed_mlp_has_zero_derivatives():
    """The seed notebook's MLP sums softmax rows, which sum to one: a constant. Its rows are
    reproduced as such; every other test reads it out with weights."""
    args = mlp_inputs()
    assert_same_tree(hod.hessian(seed_mlp, (0, 1))(*args),
                     reference(seed_mlp, 2, (0, 1))(*args), expect_zero=True)


@pytest.mark.parametrize("order", ORDERS)
def test_tanh_mlp_with_biases(order):
    args = (
        torch.randn(2, 3, dtype=D), torch.randn(3, 4, dtype=D), torch.randn(4, dtype=D),
        torch.randn(4, 2, dtype=D), torch.randn(2, dtype=D),
    )
    argnums = (0, 1, 2) if order < 4 else (0, 2)
    actual = hod.derivative(tanh_mlp, order, argnums)(*args)
    assert_same_tree(actual, reference(tanh_mlp, order, argnums)(*args))


@pytest.mark.parametrize("order", ORDERS)
def test_vector_valued(order):
    x = torch.rand(2, 3, dtype=D)
    assert_same_tree(hod.derivative(vector_valued, order)(x), reference(vector_valued, order)(x))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)])
def test_two_arguments_broadcasting(order, argnums):
    x, y = torch.randn(3, 2, dtype=D), torch.randn(2, 1, 4, dtype=D)[0]
    actual = hod.derivative(broadcasting, order, argnums)(x, y)
    assert_same_tree(actual, reference(broadcasting, order, argnums)(x, y))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_module_parameters_dict(order):
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).to(D)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 3, dtype=D)

    def loss(p, x):
        return (functional_call(model, p, (x,)) ** 2).mean()

    assert_same_tree(hod.derivative(loss, order)(params, x), reference(loss, order)(params, x))


def test_pytree_output_and_list_input():
    def f(xs):
        a, b = xs
        return {"sum": (a * b).sum(), "prod": torch.sin(a) * b.exp()}

    xs = [torch.randn(3, dtype=D), torch.randn(3, dtype=D)]
    for order in (1, 2):
        assert_same_tree(hod.derivative(f, order)(xs), reference(f, order)(xs))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_has_aux(order):
    def f(x, W):
        y = torch.tanh(x @ W)
        return y.pow(2).sum(), {"y": y, "norm": y.norm()}

    x, W = torch.randn(2, 3, dtype=D), torch.randn(3, 3, dtype=D)
    actual = hod.derivative(f, order, (0, 1), has_aux=True)(x, W)
    expected = reference(f, order, (0, 1), has_aux=True)(x, W)
    assert_same_tree(actual, expected)


@pytest.mark.parametrize("argnums", [0, (0, 1)])
def test_derivatives_match_each_derivative(argnums):
    x, W = torch.randn(2, 3, dtype=D), torch.randn(3, 2, dtype=D)

    def f(x, W):
        return torch.log_softmax(torch.sin(x @ W), dim=-1)

    value, *ds = hod.derivatives(f, 3, argnums)(x, W)
    assert_same_tree(value, f(x, W))
    for k, d in enumerate(ds, start=1):
        assert_same_tree(d, hod.derivative(f, k, argnums)(x, W))


def _tanh_mlp_inputs():
    return (
        torch.randn(2, 3, dtype=D), torch.randn(3, 4, dtype=D), torch.randn(4, dtype=D),
        torch.randn(4, 2, dtype=D), torch.randn(2, dtype=D),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("f, inputs, argnums", [
    (tanh_mlp, _tanh_mlp_inputs, 0),
    (tanh_mlp, _tanh_mlp_inputs, (0, 1, 2)),
    (tanh_mlp, _tanh_mlp_inputs, (3, 0)),
    (broadcasting, lambda: (torch.randn(3, 2, dtype=D), torch.randn(2, 4, dtype=D)), (1, 0)),
    (weighted_seed_mlp, mlp_inputs, (0, 2)),
    (vector_valued, lambda: (torch.rand(2, 3, dtype=D),), (0,)),
], ids=["tanh-x", "tanh-x-W1-b1", "tanh-W2-x", "broadcasting-y-x", "seed-x-P2", "vector"])
def test_derivatives_equal_torch_func(f, inputs, argnums, dtype):
    """``derivatives(f, 3)`` gives ``f``'s value, then each order, against torch.func in
    float64 (float32 results against the reference rounded to float32)."""
    args = inputs()
    value, *ds = hod.derivatives(f, 3, argnums)(*cast(args, dtype))
    rtol, atol = TOLERANCES[dtype]
    assert_same_tree(value, cast(f(*args), dtype), rtol=rtol, atol=atol)
    assert len(ds) == 3
    for k, d in enumerate(ds, start=1):
        expected = cast(reference(f, k, argnums)(*args), dtype)
        assert_same_tree(d, expected, rtol=rtol, atol=atol)


def test_jacobian_and_hessian_are_orders_one_and_two():
    args = mlp_inputs()
    f = weighted_seed_mlp
    assert_same_tree(hod.jacobian(f)(*args), torch.func.jacrev(f)(*args))
    assert_same_tree(hod.hessian(f, (0, 1))(*args), torch.func.hessian(f, (0, 1))(*args))


def test_non_tensor_arguments_are_constants():
    def f(x, power, scale=1.0):
        return (scale * x**power).sum()

    fn = hod.hessian(f)
    x = torch.rand(3, dtype=D)
    for power, scale in [(3, 2.0), (2, 0.5)]:
        expected = torch.func.hessian(f)(x, power, scale)
        assert_same_tree(fn(x, power, scale=scale), expected)
    assert len(fn._cache) == 2


def test_cache_retraces_on_new_signature():
    f = weighted_seed_mlp
    fn = hod.hessian(f)
    small, large = mlp_inputs(batch=2), mlp_inputs(batch=5)
    first = fn.lower(*small)
    assert fn.lower(*small) is first
    assert_same_tree(fn(*large), torch.func.hessian(f)(*large))
    assert fn.lower(*large) is not first
    assert_same_tree(fn(*small), torch.func.hessian(f)(*small))
    as_float32 = [a.float() for a in small]
    assert fn.lower(*as_float32) is not first
    expected = torch.func.hessian(f)(*small).float()
    assert_same_tree(fn(*as_float32), expected, rtol=1e-4, atol=1e-5)


def test_lower_exposes_straight_line_code():
    args = mlp_inputs()
    lowered = hod.hessian(weighted_seed_mlp).lower(*args)
    assert isinstance(lowered.graph_module, torch.fx.GraphModule)
    assert "torch." in lowered.code  # calls of ATen overloads or their public twins
    assert "for " not in lowered.code and "while " not in lowered.code
    out = lowered.graph_module(*args)[0]
    assert_same_tree(out, torch.func.hessian(weighted_seed_mlp)(*args))


def test_second_derivative_of_relu_emits_nothing():
    def f(x):
        return torch.relu(x).pow(1).sum()

    code = hod.derivative(lambda x: torch.relu(x), 2).lower(torch.randn(3, dtype=D)).code
    # relu'' = 0: the whole second derivative is a zeros tensor, no relu derivative math.
    assert "gt" not in code and "zeros" in code
    x = torch.randn(4, dtype=D)
    assert_same_tree(hod.derivative(torch.relu, 2)(x), reference(torch.relu, 2)(x),
                     expect_zero=True)


@pytest.mark.parametrize("order", [1, 2])
def test_data_and_detach_are_constants(order):
    x = torch.rand(3, dtype=D)
    expected = reference(lambda x: (x.detach() * x.sin()).sum(), order)(x)
    for f in (lambda x: (x.detach() * x.sin()).sum(), lambda x: (x.data * x.sin()).sum()):
        assert_same_tree(hod.derivative(f, order)(x), expected)


@pytest.mark.parametrize("how", ["slice", "split", "split_equal"])
def test_pieces_of_one_seeded_vector_keep_their_own_seeds(how):
    """A flat parameter vector cut into weights (sliced, or split by sizes or into equal
    pieces): each piece is seeded by the identity over its own seeds only
    (hod._derive._narrowed_seed), overlapping slices too; derivatives of orders 1-3 equal
    torch.func's."""
    x0 = torch.randn(3, dtype=torch.float64)

    def f(theta):
        if how == "slice":
            W, b, w = theta[:6], theta[6:8], theta[8:10]
        elif how == "split":
            W, b, w = theta.split([6, 2, 2])
        else:
            W1, W2, W3, b, w = theta.split(2)
            W = torch.cat([W1, W2, W3])
        W = W.view(2, 3)
        return (torch.tanh(W @ x0 + b) * w).sum() + theta[2:5].pow(3).sum()

    theta = torch.randn(10, dtype=torch.float64)
    for order in (1, 2, 3):
        assert_same_tree(hod.derivative(f, order)(theta), reference(f, order)(theta))
