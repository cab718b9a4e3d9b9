"""A scalar's top-order derivative summed from its curved nodes' local terms
(``hod._adjoint_top``): each case checks that the adjoint mode ran (``.lower().mode``) and
equals torch.func in float64 and float32, at orders 3 and 4, per example under vmap too;
cases outside its reach take another mode and are right too."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, layer, reference, scaled_weights
from torch.func import vmap

import hod

D = torch.float64



W1, W2, W3 = scaled_weights(3, 48, 48, 1)
(W1_B,) = scaled_weights(3, 48)
(W2_B,) = scaled_weights(48, 48)
(W_HEAD,) = scaled_weights(48, 6)



def tanh_net(x):
    """A PINN's network: the third derivative never crosses the 48 x 48 product."""
    return layer(torch.tanh(layer(torch.tanh(layer(x, W1)), W2)), W3).sum()


def products(x):
    """Products and a quotient of two tracked tensors (mixed partials of two inputs),
    then wide layers."""
    h, g = torch.tanh(layer(x, W1)), torch.sin(layer(x, W1_B))
    hidden = torch.sigmoid(layer(torch.sigmoid(layer(h * g / (1.5 + g * g), W2)), W2_B))
    return layer(hidden, W3).sum()


def log_softmax_head(x):
    """A coupled node: the log-softmax of 6 logits, its rule run over every seed."""
    return torch.log_softmax(layer(torch.tanh(layer(x, W1)), W_HEAD), -1)[..., 0].sum()


def scaled(x, s):
    """Two differentiated arguments, multiplied together."""
    return layer(torch.nn.functional.softplus(layer(torch.tanh(layer(x, W1) * s), W2)),
                  W3).sum()


CASES = {
    "tanh_net": (tanh_net, 0, lambda: (torch.randn(3, dtype=D),)),
    "products": (products, 0, lambda: (torch.randn(3, dtype=D),)),
    "log_softmax_head": (log_softmax_head, 0, lambda: (torch.randn(3, dtype=D),)),
    "scaled": (scaled, (0, 1), lambda: (torch.randn(3, dtype=D), torch.rand(1, dtype=D))),
}


#: Order 4 where the local terms still pay: with two tracked inputs a node has 2^4 mixed
#: partials, and ``products`` and ``scaled`` then take reverse-last mode.
ORDERS = [(case, 3) for case in CASES] + [("tanh_net", 4), ("log_softmax_head", 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("case", "order"), ORDERS)
def test_top_order_by_local_terms(case, order, dtype):
    f, argnums, make = CASES[case]
    args = make()
    fn = hod.derivative(f, order, argnums)
    typed = cast(args, dtype)
    assert fn.lower(*typed).mode == "adjoint"
    assert_same_tree(fn(*typed), cast(reference(f, order, argnums)(*args), dtype),
                     *TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["tanh_net", "products", "log_softmax_head"])
def test_per_example_under_vmap(case, dtype):
    """A PINN's residual derivatives: one 2-D point per example. The first layer's
    derivatives are the same for every example (its weights), and their terms are one
    matrix product over all examples."""
    f = CASES[case][0]
    X = torch.randn(7, 3, dtype=D)
    fn = hod.derivative(f, 3)
    box = []
    actual = vmap(lambda x: (box.append(fn.lower(x)), fn(x))[1])(X.to(dtype))
    assert box[0].mode == "adjoint" and box[0].examples == 7
    assert_same_tree(actual, vmap(reference(f, 3))(X).to(dtype), *TOLERANCES[dtype])


def test_every_order_from_the_same_tangents():
    """``hod.derivatives(f, 3)``: the value, and orders 1 and 2 from the tangents that the
    third order's local terms read."""
    x = torch.randn(3, dtype=D)
    fn = hod.derivatives(tanh_net, 3)
    assert fn.lower(x).mode == "adjoint"
    expected = (tanh_net(x), *(reference(tanh_net, k)(x) for k in (1, 2, 3)))
    assert_same_tree(fn(x), expected)


def test_every_order_per_example():
    X = torch.randn(4, 3, dtype=D)
    fn = hod.derivatives(tanh_net, 3)
    box = []
    actual = vmap(lambda x: (box.append(fn.lower(x)), fn(x))[1])(X)
    assert box[0].mode == "adjoint"
    expected = (vmap(tanh_net)(X), *(vmap(reference(tanh_net, k))(X) for k in (1, 2, 3)))
    assert_same_tree(actual, expected)


def test_has_aux():
    def f(x):
        y = tanh_net(x)
        return y, {"y": y}

    x = torch.randn(3, dtype=D)
    fn = hod.derivative(f, 3, has_aux=True)
    assert fn.lower(x).mode == "adjoint"
    assert_same_tree(fn(x), reference(f, 3, has_aux=True)(x))


@pytest.mark.parametrize("name", ["vector_output", "cumprod", "narrow_products"])
def test_outside_its_reach_another_mode_runs(name):
    """Not a scalar, a node neither elementwise nor linear in its tracked input (cumprod),
    or local terms that cost more than the propagation they replace (no wide product)."""
    f = {
        "vector_output": lambda x: torch.tanh(layer(torch.tanh(layer(x, W1)), W2)),
        "cumprod": lambda x: torch.cumprod(layer(x, W1), 0).pow(2).sum(),
        "narrow_products": lambda x: (torch.sin(x) * torch.cos(x).exp()).sum(),
    }[name]
    x = torch.randn(3, dtype=D)
    fn = hod.derivative(f, 3)
    assert fn.lower(x).mode != "adjoint"
    assert_same_tree(fn(x), reference(f, 3)(x))
