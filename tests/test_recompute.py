"""Autograd through generated code by recomputation (hod._recompute): when autograd alone
watches a call, the planned code runs without recording and a backward pass runs the plain
code again. Gradients against torch.func's, recorded under autograd, in float64 and
float32; second derivatives with create_graph=True; what is not recomputed."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree
from torch.func import hessian

import hod

D = torch.float64


def _model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model.to(dtype)


def _recomputed(tensor: torch.Tensor) -> bool:
    """Whether autograd reaches the result's code through one recomputed node (a view of
    its output may come first)."""
    nodes = [tensor.grad_fn]
    for _ in range(3):
        if any(type(n).__name__ == "RecomputedBackward" for n in nodes):
            return True
        nodes = [f for n in nodes if n is not None for f, _ in n.next_functions]
    return False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_reach_captured_parameters_and_inputs(dtype):
    """d/d(params, x) of a function of the input Hessian of a module's loss."""
    model = _model(dtype)
    weights = torch.randn(6, 6, dtype=dtype)

    def f(x):
        return model(x).tanh().sum()

    def grads(hessian_fn):
        x = torch.randn(6, dtype=dtype, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        curvature = hessian_fn(f)(x)
        wanted = [x, *model.parameters()]
        return curvature, torch.autograd.grad((curvature * weights).sum(), wanted)

    curvature, got = grads(hod.hessian)
    assert _recomputed(curvature)
    rtol, atol = TOLERANCES[dtype]
    assert_same_tree(got, grads(hessian)[1], rtol=rtol, atol=atol)


def test_second_derivatives_with_create_graph():
    """The recomputed backward records itself when asked: d/dx of d trace(H)/d params."""
    model = _model(D)

    def f(x):
        return model(x).pow(3).sum()

    def second(hessian_fn):
        x = torch.randn(6, dtype=D, generator=torch.Generator().manual_seed(2))
        x.requires_grad_()
        curvature = hessian_fn(f)(x)
        first = torch.autograd.grad(curvature.trace(), list(model.parameters()),
                                    create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in first), x)

    assert_same_tree(second(hod.hessian), second(hessian))


def test_an_input_changed_in_place_before_backward_is_an_error():
    x = torch.randn(6, dtype=D, requires_grad=True)
    y = x * 1.0
    curvature = hod.hessian(lambda v: v.sin().prod())(y)
    assert _recomputed(curvature)
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        curvature.sum().backward()


def test_a_value_that_is_the_input_is_a_new_tensor():
    """``derivatives`` returns f's value; for f(x) = x that value is not x itself."""
    x = torch.randn(5, dtype=D, requires_grad=True)
    value, jacobian = hod.derivatives(lambda v: v, 1)(x)
    assert value is not x and torch.equal(value, x)
    (value.sum() + jacobian.sum()).backward()
    assert torch.equal(x.grad, torch.ones(5, dtype=D))


def test_what_is_not_recomputed():
    """No tensor requiring grad, grad mode off, or a torch.func transform: no recording or
    recomputation (functorch differentiates the plain code)."""
    model = _model(D)

    def f(x):
        return model(x).tanh().sum()

    x = torch.randn(6, dtype=D)
    with torch.no_grad():
        assert hod.hessian(f)(x).grad_fn is None
    for p in model.parameters():
        p.requires_grad_(False)
    assert hod.hessian(f)(x).grad_fn is None
    x.requires_grad_()
    assert _recomputed(hod.hessian(f)(x))
    through = torch.func.grad(lambda v: hod.hessian(f)(v).trace())(x.detach())
    assert_same_tree(through, torch.func.grad(lambda v: hessian(f)(v).trace())(x.detach()))


def test_under_no_grad_captured_parameters_take_the_planned_code(monkeypatch):
    """With grad mode off nothing records, so a call closing over a module's parameters
    (which require grad) runs the planned code, as one without them does."""
    import hod._build

    planned = []
    original = hod._build.Lowered._planned

    def spied(self, tensors):
        planned.append(self)
        return original(self, tensors)

    monkeypatch.setattr(hod._build.Lowered, "_planned", spied)
    model = _model(D)

    def f(x):
        return model(x).tanh().sum()

    x = torch.randn(6, dtype=D)
    fn = hod.hessian(f)
    assert fn.lower(x).planned_module is not None
    with torch.no_grad():
        actual = fn(x)
    assert planned and actual.grad_fn is None
    assert_same_tree(actual, hessian(f)(x))
