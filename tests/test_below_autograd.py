"""Planned code run below autograd's dispatch keys (hod._below_autograd): only where no
result views a caller's tensor and no two results overlap; results that autograd later
differentiates (after ``requires_grad_()``, through the recomputed node, after an in-place
change) give torch.func's gradients in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_tree
from torch.fx.experimental.proxy_tensor import make_fx

import hod
from hod._below_autograd import apart, results_own

D = torch.float64
aten = torch.ops.aten


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)
    ).to(D)


def _below(lowered) -> list[bool]:
    """Whether each later call of ``lowered``'s planned code runs with the ADInplaceOrView
    key excluded (a list that grows with the calls)."""
    seen = []
    forward = lowered.planned_module.forward

    def spied(*args):
        seen.append(torch._C._dispatch_tls_is_dispatch_key_excluded(
            torch._C.DispatchKey.ADInplaceOrView))
        return forward(*args)

    lowered.planned_module.forward = spied
    return seen


@pytest.mark.parametrize("watched", [False, True])
def test_planned_code_runs_below_autograd_from_its_second_call(watched):
    """The first call's results show they are apart; later calls run below, on plain
    tensors and inside the recomputed node (captured parameters requiring grad)."""
    model = _model()
    model.requires_grad_(watched)
    x = torch.randn(5, dtype=D)
    fn = hod.hessian(lambda v: model(v).tanh().sum())
    lowered = fn.lower(x)
    seen = _below(lowered)
    first, second = fn(x), fn(x)
    assert seen == [False, True] and lowered.below_autograd is True
    assert (first.grad_fn is not None) == watched
    assert_same_tree(second, torch.func.hessian(lambda v: model(v).tanh().sum())(x))


def test_results_made_below_autograd_are_differentiable():
    """A plain call's result made to require grad, and a recomputed one changed in place
    before backward, differentiate like torch.func's Hessian."""
    model = _model()
    x = torch.randn(5, dtype=D)

    def f(v):
        return model(v).sin().sum()

    fn = hod.hessian(f)
    for _ in range(2):  # the second call runs below autograd
        with torch.no_grad():
            plain = fn(x)
        watched = fn(x)
    assert fn.lower(x).below_autograd is True
    plain.requires_grad_()
    (plain * plain).sum().backward()
    assert_same_tree(plain.grad, 2 * plain.detach())

    watched.mul_(3.0)
    grads = torch.autograd.grad(watched.sum(), list(model.parameters()))
    expected = torch.func.grad(
        lambda p: 3.0 * torch.func.hessian(
            lambda v: torch.func.functional_call(model, p, (v,)).sin().sum())(x).sum()
    )(dict(model.named_parameters()))
    assert_same_tree(grads, tuple(expected.values()))


def test_results_viewing_a_callers_tensor_are_not_own():
    """A result that is a view of an input, an out= write into an input, or a captured
    tensor keeps the code above autograd; new tensors and writes into the code's own
    memory (placeholders after the inputs) do not."""
    x, buffer = torch.randn(4, dtype=D), torch.empty(4, dtype=D)

    def graph(f):
        return make_fx(f)(x, buffer).graph

    assert results_own(graph(lambda v, b: (v * 2, aten.mul.out(v, v, out=b))), 1)
    assert not results_own(graph(lambda v, b: (v * 2, v[1:])), 1)
    assert not results_own(graph(lambda v, b: (aten.mul.out(v, v, out=v),)), 1)
    assert not results_own(graph(lambda v, b: (aten.mul.out(v, v, out=b),)), 2)


def test_overlapping_results_are_not_apart():
    m = torch.randn(4, 4, dtype=D)
    assert apart([m[:2], m[2:], torch.randn(3), m[:0]])
    assert apart([m[:, 0], m[:, 1]]) is False  # apart elementwise, but their spans overlap
    assert not apart([m, m])
    assert not apart([m, m.t()])
    assert not apart([m[:3], m[2:]])
