"""Hessians of scalars summed from their curved nodes' local terms (``hod._adjoint``):
each case checks that the adjoint mode ran (``.lower().mode``) and equals torch.func in
float64; cases outside its reach take reverse-last mode and are right too."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, reference
from torch.func import hessian, vmap

import hod

D = torch.float64


def _weights(*sizes):
    torch.manual_seed(sum(sizes))
    return [torch.randn(a, b, dtype=D) / a**0.5 for a, b in zip(sizes[:-1], sizes[1:], strict=True)]


W1, W2, W3 = _weights(3, 96, 96, 1)


def _layer(x, W):
    return x @ W.to(x.dtype)


def tanh_net(x):
    return _layer(torch.tanh(_layer(torch.tanh(_layer(x, W1)), W2)), W3).sum()


def products(x):
    """Elementwise products of two tracked tensors, a quotient, a power and a select,
    between wide products."""
    h = torch.sigmoid(_layer(torch.tanh(_layer(x, W1)), W2))
    g = torch.sin(_layer(x, W1))
    return (h * g / (1.5 + g * g)).pow(3).sum() + torch.where(h > 0.5, h, g).sum()


def scaled(x, s):
    """Two differentiated arguments, multiplied together."""
    return torch.nn.functional.softplus(_layer(torch.tanh(_layer(x, W1) * s), W2)).sum()


W_IN, W_OUT = _weights(64, 32, 10)
(W_LOGITS,) = _weights(96, 10)
LABEL = torch.tensor([3])


def classifier(x):
    """relu layers and a cross-entropy: f bends only at the log-softmax of 10 logits, so
    with 64 seeds its logits' derivatives come from 10 reverse sweeps."""
    logits = _layer(torch.relu(_layer(x, W_IN)), W_OUT).reshape(1, 10)
    return torch.nn.functional.cross_entropy(logits, LABEL)


W_WIDE, W_HIDDEN = _weights(200, 16, 10)


def two_bends(x):
    """Bends at 16 tanh entries and 10 logits: 26 reverse sweeps for 200 seeds."""
    logits = _layer(torch.tanh(_layer(x, W_WIDE)), W_HIDDEN).reshape(1, 10)
    return torch.nn.functional.cross_entropy(logits, LABEL)


def small_classifier(x):
    """Three seeds, ten logits: the log-softmax's local term over seed pairs."""
    logits = _layer(torch.tanh(_layer(x, W1)), W_LOGITS).reshape(1, 10)
    return torch.nn.functional.cross_entropy(logits, LABEL)


torch.manual_seed(7)
DATA, DATA_2 = torch.randn(60, 8, dtype=D), torch.randn(40, 8, dtype=D)
LABELS = (torch.rand(60, dtype=D) < 0.5).to(D)


def logistic(w):
    """A GLM's loss: a chain of elementwise ops of ``X w`` (separable in its 60 entries),
    whose local terms sum to one contraction with the chain's Hessian diagonal."""
    return torch.nn.functional.binary_cross_entropy_with_logits(_layer(DATA, w.unsqueeze(1))
                                                                .squeeze(1), LABELS)


def two_roots(w):
    """Two separable chains of two products of ``w``: no term between them."""
    return (torch.nn.functional.softplus(_layer(DATA, w.unsqueeze(1))).sum()
            + torch.tanh(_layer(DATA_2, w.unsqueeze(1))).pow(2).mean())


CASES = {
    "logistic": (logistic, 0, lambda: (0.3 * torch.randn(8, dtype=D),)),
    "two_roots": (two_roots, 0, lambda: (0.3 * torch.randn(8, dtype=D),)),
    "classifier": (classifier, 0, lambda: (torch.randn(64, dtype=D),)),
    "small_classifier": (small_classifier, 0, lambda: (torch.randn(3, dtype=D),)),
    "two_bends": (two_bends, 0, lambda: (torch.randn(200, dtype=D),)),
    "tanh_net": (tanh_net, 0, lambda: (torch.randn(3, dtype=D),)),
    "products": (products, 0, lambda: (torch.randn(3, dtype=D),)),
    "scaled": (scaled, (0, 1), lambda: (torch.randn(3, dtype=D), torch.rand(1, dtype=D))),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_hessian_by_local_terms(case, dtype):
    f, argnums, make = CASES[case]
    args = make()
    fn = hod.hessian(f, argnums)
    typed = cast(args, dtype)
    assert fn.lower(*typed).mode == "adjoint"
    assert_same_tree(fn(*typed), cast(reference(f, 2, argnums)(*args), dtype),
                     *TOLERANCES[dtype])


def coupled_tail(w):
    """Entries of ``X w`` meeting again after their chain (``tanh(z) * sum(tanh(z))``): not
    separable, so each curved node keeps its own term."""
    t = torch.tanh(_layer(DATA, w.unsqueeze(1)))
    return (torch.exp(t) * t.sum()).sum()


def test_a_tail_that_is_not_separable_keeps_its_terms():
    w = 0.3 * torch.randn(8, dtype=D)
    assert_same_tree(hod.hessian(coupled_tail)(w), hessian(coupled_tail)(w))


def per_example_logistic(x):
    return torch.nn.functional.binary_cross_entropy_with_logits(DATA[:, :3] @ x, LABELS)


@pytest.mark.parametrize("f", [tanh_net, small_classifier, per_example_logistic],
                         ids=lambda f: f.__name__)
def test_per_example_hessians_under_vmap(f):
    X = torch.randn(5, 3, dtype=D)
    fn = hod.hessian(f)
    box = []
    actual = vmap(lambda x: (box.append(fn.lower(x)), fn(x))[1])(X)
    assert box[0].mode == "adjoint" and box[0].examples == 5
    assert_same_tree(actual, vmap(hessian(f))(X))


def test_has_aux_and_pytree_argument():
    def f(p):
        y = (torch.tanh(_layer(torch.tanh(p["x"] @ W1), W2)) * p["s"]).sum()
        return y, {"y": y}

    p = {"x": torch.randn(3, dtype=D), "s": torch.randn(1, dtype=D)}
    fn = hod.hessian(f, has_aux=True)
    assert fn.lower(p).mode == "adjoint"
    assert_same_tree(fn(p), reference(f, 2, has_aux=True)(p))


@pytest.mark.parametrize("name", ["cumprod", "product_of_tracked_matrices", "wide_input"])
def test_outside_its_reach_reverse_last_runs(name):
    """A node neither elementwise nor linear in its tracked inputs (cumprod, a product of
    two tracked matrices), or seeds too many for the work they save (400 seeds through
    elementwise layers that mix the entries: local terms of 400^2 per entry), take
    reverse-last mode."""
    f, x = {
        "cumprod": (lambda x: torch.cumprod(x @ W1, 0).pow(2).sum(), torch.randn(3, dtype=D)),
        "product_of_tracked_matrices": (
            lambda x: torch.tanh(x.reshape(2, 2) @ x.reshape(2, 2).T).sum(),
            torch.randn(4, dtype=D)),
        "wide_input": (lambda x: torch.tanh(x.sum() * x).sum(), torch.randn(400, dtype=D)),
    }[name]
    fn = hod.hessian(f)
    assert fn.lower(x).mode == "reverse-last"
    assert_same_tree(fn(x), hessian(f)(x))


@pytest.mark.parametrize("case", ["tanh_net", "scaled"])
def test_value_gradient_and_hessian_from_one_sweep(case):
    """``hod.derivatives(f, 2)``: the gradient is the adjoint of the differentiated
    leaves, from the same reverse sweep as the curved nodes' adjoints."""
    f, argnums, make = CASES[case]
    args = make()
    fn = hod.derivatives(f, 2, argnums)
    assert fn.lower(*args).mode == "adjoint"
    expected = (f(*args), reference(f, 1, argnums)(*args), reference(f, 2, argnums)(*args))
    assert_same_tree(fn(*args), expected)


def test_value_gradient_and_hessian_per_example():
    X = torch.randn(4, 3, dtype=D)
    fn = hod.derivatives(tanh_net, 2)
    box = []
    actual = vmap(lambda x: (box.append(fn.lower(x)), fn(x))[1])(X)
    assert box[0].mode == "adjoint"
    expected = (vmap(tanh_net)(X), vmap(reference(tanh_net, 1))(X), vmap(hessian(tanh_net))(X))
    assert_same_tree(actual, expected)


def rows_net(X):
    """Independent rows, summed: the Hessian is block diagonal over the batch."""
    return _layer(torch.tanh(_layer(torch.tanh(_layer(X, W1)), W2)), W3).sum()


@pytest.mark.parametrize("transform", ["hessian", "derivatives"])
def test_a_batch_of_independent_rows_is_seeded_per_row(transform):
    """Seeds of one row (3, not 12): the local terms are summed per row and placed on the
    batch diagonal."""
    X = torch.randn(4, 3, dtype=D)
    fn = hod.hessian(rows_net) if transform == "hessian" else hod.derivatives(rows_net, 2)
    lowered = fn.lower(X)
    assert lowered.mode == "adjoint" and lowered.seed_size == 3
    H = hessian(rows_net)(X)
    expected = H if transform == "hessian" else (rows_net(X), reference(rows_net, 1)(X), H)
    assert_same_tree(fn(X), expected)
