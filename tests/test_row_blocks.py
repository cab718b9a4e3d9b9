"""Reverse-last Hessians read by the later leaves' gradients (``hod._row_blocks``): the
planner's choice of which leaf leads a block, and flat parameter vectors whose gradient is
read in pieces and completed by symmetry, against torch.func."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, reference

import hod
import hod._build

D = torch.float64


def _net(x, w1, b1, w2, b2):
    """tanh layer, then a linear layer and a log-softmax loss: ``w1`` enters first."""
    h = torch.tanh(torch.nn.functional.linear(x, w1, b1))
    return -torch.log_softmax(torch.nn.functional.linear(h, w2, b2), -1)[:, 0].sum()


def layers_in_order(w1, w2, w3, x):
    """Three layers, narrow first: ``w1`` (6 weights) enters first, ``w3`` (64) last."""
    h = torch.tanh(torch.tanh(x @ w1.T) @ w2.T)
    return -torch.log_softmax(h @ w3.T, -1)[:, 0].sum()


def layers_reversed(w3, w2, w1, x):
    return layers_in_order(w1, w2, w3, x)


def flat_parameters(theta, x):
    """One vector split into the layers' weights (as a model's flat parameters are)."""
    w1, b1, w2, b2 = theta.split([15, 5, 10, 2])
    return _net(x, w1.view(5, 3), b1, w2.view(2, 5), b2)


def input_then_flat(x, theta):
    """The pieced leaf second: its rows follow ``x``'s seeds (one row, not compressed)."""
    return flat_parameters(theta, x)


def flat_with_unused_piece(theta, x):
    """The middle piece does not reach the output: its rows and columns are zero."""
    w1, _, w2 = theta.split([15, 4, 10])
    return _net(x, w1.view(5, 3), torch.zeros(5, dtype=x.dtype), w2.view(2, 5),
                torch.zeros(2, dtype=x.dtype))


def flat_rows(theta, x):
    """A 2-D leaf split along its rows."""
    w1, w2 = theta.split([5, 2])
    return _net(x, w1[:, :3], w1[:, 3], w2[:, :5], w2[:, 5])


def _layers():
    return [torch.randn(2, 3, dtype=D), torch.randn(8, 2, dtype=D), torch.randn(8, 8, dtype=D)]


def _spy(monkeypatch) -> list:
    """The seed plans that reverse-last builds use, as they are made."""
    plans, original = [], hod._build.plan_reverse

    def spied(state, shapes):
        reverse, seeds = original(state, shapes)
        plans.append(seeds)
        return reverse, seeds

    monkeypatch.setattr(hod._build, "plan_reverse", spied)
    return plans


CASES = {
    "flat": (flat_parameters, lambda: (torch.randn(32, dtype=D), torch.randn(4, 3, dtype=D)),
             0, ((0, (15, 5, 10, 2)),)),
    "flat-second": (input_then_flat,
                    lambda: (torch.randn(1, 3, dtype=D), torch.randn(32, dtype=D)),
                    (0, 1), ((1, (15, 5, 10, 2)),)),
    "unused-piece": (flat_with_unused_piece,
                     lambda: (torch.randn(29, dtype=D), torch.randn(4, 3, dtype=D)),
                     0, ((0, (15, 4, 10)),)),
    "rows": (flat_rows, lambda: (torch.randn(7, 6, dtype=D), torch.randn(4, 3, dtype=D)),
             0, ((0, (30, 12)),)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_pieced_gradients_complete_the_hessian(monkeypatch, case, dtype):
    """A gradient concatenated from pieces is read piece by piece, each over the seeds up
    to its own end, and completed by symmetry: the plan says so, and the Hessian is
    torch.func's (an unused piece's zero rows, a leaf after another, rows of a matrix)."""
    f, make, argnums, pieces = CASES[case]
    plans = _spy(monkeypatch)
    args = make()
    fn = hod.hessian(f, argnums)
    actual = fn(*cast(args, dtype))
    assert plans and plans[-1].lead_last
    assert [(p.leaf, p.sizes) for p in plans[-1].pieces] == list(pieces)
    rtol, atol = TOLERANCES[dtype]
    assert_same_tree(actual, cast(reference(f, 2, argnums)(*args), dtype), rtol=rtol, atol=atol)


def test_values_and_gradient_come_with_the_pieced_hessian(monkeypatch):
    """``derivatives`` reads the value, the gradient (the pieces' concatenation) and the
    completed Hessian from one build."""
    plans = _spy(monkeypatch)
    theta, x = torch.randn(32, dtype=D), torch.randn(4, 3, dtype=D)
    value, gradient, hessian = hod.derivatives(flat_parameters, 2)(theta, x)
    assert plans[-1].pieces
    assert_same_tree(value, flat_parameters(theta, x))
    assert_same_tree(gradient, torch.func.grad(flat_parameters)(theta, x))
    assert_same_tree(hessian, reference(flat_parameters, 2)(theta, x))


@pytest.mark.parametrize(("f", "last_leads"), [(layers_in_order, True),
                                                (layers_reversed, False)])
@pytest.mark.parametrize("order", [2, 3])
def test_the_cheaper_leaf_leads(monkeypatch, f, last_leads, order):
    """Blocks pairing the narrow first layer with the wide last one are read from the last
    layer's gradient (a short backward sweep), seeded by the first layer's few weights,
    whichever order the arguments come in; the blocks are torch.func's either way."""
    plans = _spy(monkeypatch)
    layers = _layers()
    args = (*(layers if f is layers_in_order else layers[::-1]), torch.randn(1, 3, dtype=D))
    argnums = (0, 1, 2)
    actual = hod.derivative(f, order, argnums)(*args)
    assert plans and plans[-1].lead_last is last_leads
    assert_same_tree(actual, reference(f, order, argnums)(*args))
