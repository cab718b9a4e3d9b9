"""hod functions inside torch.func transforms, autograd, torch.compile and a Newton loop."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_tree, reference
from models import tanh_loss
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call, grad, hessian, vmap

import hod

D = torch.float64

# (in_dims, argnums, shapes of (x, W)): batching x by rows or columns, W, or both.
VMAP_CASES = {
    "x-rows": ((0, None), 0, ((5, 3), (3, 2))),
    "x-columns": ((1, None), 0, ((3, 5), (3, 2))),
    "W-stack": ((None, 0), 1, ((3,), (4, 3, 2))),
    "both": ((0, 0), (0, 1), ((4, 3), (4, 3, 2))),
}


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("case", VMAP_CASES)
def test_vmap_in_dims(case, order):
    in_dims, argnums, shapes = VMAP_CASES[case]
    x, W = (torch.randn(*s, dtype=D) for s in shapes)
    actual = vmap(hod.derivative(tanh_loss, order, argnums), in_dims)(x, W)
    assert_same_tree(actual, vmap(reference(tanh_loss, order, argnums), in_dims)(x, W))


def test_vmap_of_vmap_per_sample_hessians():
    X, W = torch.randn(2, 4, 3, dtype=D), torch.randn(3, 2, dtype=D)

    def nested(fn):
        return vmap(vmap(fn, in_dims=(0, None)), in_dims=(0, None))

    assert_same_tree(nested(hod.hessian(tanh_loss))(X, W), nested(hessian(tanh_loss))(X, W))


def test_vmap_over_a_function_with_pytree_output():
    def f(x):
        return {"a": torch.sin(x).sum(), "b": torch.exp(x) * x}

    X = torch.randn(4, 3, dtype=D)
    assert_same_tree(vmap(hod.hessian(f))(X), vmap(hessian(f))(X))


def test_grad_of_a_function_that_calls_hod_hessian():
    x, W = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D)

    def curvature(W, hessian_fn):
        return hessian_fn(tanh_loss)(x, W).diagonal().sum()

    actual = grad(curvature)(W, hod.hessian)
    assert_same_tree(actual, grad(curvature)(W, hessian))


def test_jacfwd_and_jacrev_of_hod_outputs():
    x, W = torch.randn(3, dtype=D), torch.randn(3, 2, dtype=D)
    for transform in (torch.func.jacfwd, torch.func.jacrev):
        actual = transform(hod.jacobian(tanh_loss), argnums=1)(x, W)
        assert_same_tree(actual, transform(torch.func.jacrev(tanh_loss), argnums=1)(x, W))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_backward_through_hod_outputs(order):
    x, W = torch.randn(2, 3, dtype=D), torch.randn(3, 2, dtype=D)
    W_hod, W_ref = W.clone().requires_grad_(), W.clone().requires_grad_()
    out = hod.derivative(tanh_loss, order)(x, W_hod)
    assert out.requires_grad
    out.pow(2).sum().backward()
    reference(tanh_loss, order)(x, W_ref).pow(2).sum().backward()
    assert_same_tree(W_hod.grad, W_ref.grad)


def test_backward_reaches_module_parameters_the_function_captures():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.to(D)
    x = torch.randn(3, dtype=D)

    def f(x):
        return model(x).sum()

    def parameter_grads(hessian_fn):
        curvature = hessian_fn(f)(x).trace()
        return torch.autograd.grad(curvature, list(model.parameters()), materialize_grads=True)

    assert_same_tree(parameter_grads(hod.hessian), parameter_grads(hessian))


def test_torch_compile_round_trip():
    # aot_eager runs dynamo and AOT autograd over the generated code without inductor's
    # C++ compilation, which costs about 30 s on CI's two cores.
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(hod.hessian(tanh_loss), backend=counter)
    for batch in (4, 4, 6):
        x, W = torch.randn(batch, 3, dtype=D), torch.randn(3, 2, dtype=D)
        assert_same_tree(compiled(x, W), hessian(tanh_loss)(x, W))
    assert counter.frame_count >= 1 and counter.op_count > 10


@pytest.mark.parametrize("order", [1, 2])
def test_per_sample_derivatives_of_a_module_via_functional_call(order):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to(D)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x):
        return torch.log_softmax(functional_call(model, p, (x,)), dim=-1)[0]

    X = torch.randn(5, 3, dtype=D)
    actual = vmap(hod.derivative(loss, order), in_dims=(None, 0))(params, X)
    assert_same_tree(actual, vmap(reference(loss, order), in_dims=(None, 0))(params, X))


def convex(w, A, b):
    """Strictly convex: a sum of exponentials plus a quadratic, minus a linear term."""
    return torch.exp(A @ w).sum() + 0.5 * (w * w).sum() - (b * w).sum()


def newton_step(w, A, b, hessian_fn, grad_fn):
    return w - torch.linalg.solve(hessian_fn(convex)(w, A, b), grad_fn(convex)(w, A, b))


def test_newton_step_matches_torch_func_and_converges():
    A, b = 0.3 * torch.randn(6, 4, dtype=D), torch.randn(4, dtype=D)
    w = torch.zeros(4, dtype=D)
    step = newton_step(w, A, b, hod.hessian, hod.jacobian)
    assert_same_tree(step, newton_step(w, A, b, hessian, torch.func.jacrev))
    for _ in range(8):
        w = newton_step(w, A, b, hod.hessian, hod.jacobian)
    assert torch.func.grad(convex)(w, A, b).abs().max() < 1e-12


def test_gauss_newton_step_from_the_residual_jacobian():
    t = torch.linspace(0, 1, 8, dtype=D)
    y = 2.0 * torch.exp(-1.5 * t)

    def residual(theta):
        return theta[0] * torch.exp(theta[1] * t) - y

    theta = torch.tensor([1.0, -1.0], dtype=D)
    for _ in range(10):
        J = hod.jacobian(residual)(theta)
        theta = theta - torch.linalg.lstsq(J, residual(theta).unsqueeze(1)).solution[:, 0]
    assert_same_tree(theta, torch.tensor([2.0, -1.5], dtype=D), rtol=1e-7, atol=1e-7)


def test_multihead_attention_module_where_torch_func_cannot():
    """torch.func.hessian fails on the fused attention kernel (no forward AD); hod decomposes
    it. Checked against the same layer written with matmul and softmax."""
    att = torch.nn.MultiheadAttention(4, 2, batch_first=True).double().eval()
    q = torch.rand(1, 3, 4, dtype=D)

    def layer(q):
        return att(q, q, q, need_weights=False)[0].sum()

    def by_hand(q):
        Q, K, V = (q @ att.in_proj_weight.T + att.in_proj_bias).chunk(3, -1)
        heads = [t.view(1, 3, 2, 2).transpose(1, 2) for t in (Q, K, V)]
        A = torch.softmax(heads[0] @ heads[1].transpose(-1, -2) / 2**0.5, -1) @ heads[2]
        return (A.transpose(1, 2).reshape(1, 3, 4) @ att.out_proj.weight.T
                + att.out_proj.bias).sum()

    assert_same_tree(hod.hessian(layer)(q), torch.func.hessian(by_hand)(q))
