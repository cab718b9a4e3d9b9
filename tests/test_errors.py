"""Every error a user can cause: a hod exception whose message starts with the call, says
what was expected and what came, and suggests a fix."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_same_tree, reference
from models import tanh_loss
from torch.func import grad, vmap

import hod
from hod import InputError, MemoryLimitError, OutputError, TracingError, UnsupportedOperatorError

D = torch.float64
x = torch.rand(3, dtype=D) + 0.5


def two_args(a, b):
    return (a * b).sum()


def branchy(x):
    return x.sum() if x.sum() > 0 else -x.sum()


def reads_item(x):
    return x.sum() * x.max().item()


def masks(x):
    return x[x > 0.7]


def mutates(x):
    x.mul_(2)
    return x.sum()


def writes_slice(x):
    x[0] = 1.0
    return x.sum()


def uses_rand(x):
    return (x * torch.rand(3, dtype=D)).sum()


def uses_bernoulli(x):
    return (torch.bernoulli(torch.sigmoid(x)) * x).sum()


def uses_dropout(x):
    return torch.nn.functional.dropout(x, 0.5, training=True).pow(2).sum()


def uses_zeta(x):
    return torch.special.zeta(x + 1.0, 2.0)


def uses_zeta_scalar(x):
    return torch.special.zeta(x + 1.0, 2.0).sum()


# id: (thunk, exception, message start, fragments the message must contain)
CASES = {
    "order-zero": (
        lambda: hod.derivative(torch.sin, 0), InputError, "hod.derivative(sin, order=0)",
        ["positive integer, got 0", "Fix: use order=1"]),
    "order-float": (
        lambda: hod.derivative(torch.sin, 2.0), InputError, "hod.derivative(sin, order=2.0)",
        ["positive integer, got 2.0"]),
    "order-bool": (
        lambda: hod.derivative(torch.sin, True), InputError, "hod.derivative(sin, order=True)",
        ["positive integer, got True"]),
    "not-callable": (
        lambda: hod.hessian(3), InputError, "hod.hessian(int)",
        ["must be a callable, got int", "Fix:"]),
    "argnums-out-of-range": (
        lambda: hod.hessian(two_args, argnums=2)(x, x), InputError,
        "hod.hessian(two_args, argnums=2)",
        ["positional argument 2", "passed 2 positional argument(s)", "Fix:"]),
    "argnums-duplicated": (
        lambda: hod.hessian(two_args, argnums=(0, 0)), InputError,
        "hod.hessian(two_args, argnums=(0, 0))", ["names an argument twice", "Fix:"]),
    "argnums-negative": (
        lambda: hod.hessian(two_args, argnums=-1), InputError,
        "hod.hessian(two_args, argnums=-1)", ["non-negative, got -1", "Fix:"]),
    "argnums-list": (
        lambda: hod.hessian(two_args, argnums=[0]), InputError,
        "hod.hessian(two_args, argnums=[0])", ["int or a non-empty tuple", "Fix:"]),
    "argnums-empty": (
        lambda: hod.hessian(two_args, argnums=()), InputError,
        "hod.hessian(two_args, argnums=())", ["int or a non-empty tuple"]),
    "memory-limit-negative": (
        lambda: hod.hessian(torch.sin, memory_limit=-1), InputError, "hod.hessian(sin)",
        ["memory_limit must be a positive number of bytes or None, got -1", "Fix:"]),
    "int-input": (
        lambda: hod.hessian(tanh_loss)(torch.arange(3), torch.eye(3)), InputError,
        "hod.hessian(tanh_loss)",
        ["argument 0 is differentiated but has dtype torch.int64", "Expected: a real "
         "floating-point tensor", "Fix: convert it"]),
    "bool-input": (
        lambda: hod.jacobian(torch.sin)(torch.ones(3, dtype=torch.bool)), InputError,
        "hod.jacobian(sin)", ["has dtype torch.bool"]),
    "complex-input": (
        lambda: hod.jacobian(torch.abs)(torch.ones(3, dtype=torch.complex64)), InputError,
        "hod.jacobian(abs)", ["has dtype torch.complex64"]),
    "number-input": (
        lambda: hod.jacobian(torch.sin)(3.0), InputError, "hod.jacobian(sin)",
        ["is a float, not a tensor", "Fix: pass it as a tensor"]),
    "non-tensor-output": (
        lambda: hod.hessian(lambda x: (x.sum(), "label"))(x), InputError,
        "hod.hessian(<lambda>)",
        ["output contains a str", "Expected: a tensor or a pytree", "has_aux=True"]),
    "integer-output": (
        lambda: hod.jacobian(lambda x: (x > 0).long())(x), OutputError,
        "hod.jacobian(<lambda>)",
        ["returns a tensor of dtype torch.int64", "Expected: floating-point outputs"]),
    "has-aux-not-a-pair": (
        lambda: hod.hessian(lambda x: x.sum(), has_aux=True)(x), OutputError,
        "hod.hessian(<lambda>)",
        ["must return a pair (output, aux), but it returned Tensor", "Fix:"]),
    "has-aux-triple": (
        lambda: hod.hessian(lambda x: (x.sum(), x, x), has_aux=True)(x), OutputError,
        "hod.hessian(<lambda>)", ["returned tuple of length 3"]),
    "control-flow": (
        lambda: hod.hessian(branchy)(x), TracingError, "hod.hessian(branchy)",
        ["branches on the values of a tensor", "Expected: control flow that depends only "
         "on shapes", "torch.where", "torch.cond"]),
    "item": (
        lambda: hod.hessian(reads_item)(x), TracingError, "hod.hessian(reads_item)",
        ["depends on the data in a tensor", "test_errors.py", "x.max().item()",
         "Fix: keep values as tensors"]),
    "boolean-mask": (
        lambda: hod.jacobian(masks)(x), TracingError, "hod.jacobian(masks)",
        ["depends on the data in a tensor", "x[x > 0.7]"]),
    "in-place-op-on-input": (
        lambda: hod.hessian(mutates)(x.clone()), TracingError, "hod.hessian(mutates)",
        ["modifies its input tensor #0 in place", "Fix: use the out-of-place form"]),
    "setitem-on-input": (
        lambda: hod.hessian(writes_slice)(x.clone()), TracingError,
        "hod.hessian(writes_slice)", ["modifies its input tensor #0 in place"]),
    "torch-rand": (
        lambda: hod.hessian(uses_rand)(x), TracingError, "hod.hessian(uses_rand)",
        ["draws random numbers (aten.rand.default", "torch.rand(3, dtype=D)",
         "allow_random=True"]),
    "bernoulli": (
        lambda: hod.jacobian(uses_bernoulli)(x), TracingError, "hod.jacobian(uses_bernoulli)",
        ["draws random numbers", "torch.bernoulli("]),
    "dropout-in-training-mode": (
        lambda: hod.hessian(uses_dropout)(x), TracingError, "hod.hessian(uses_dropout)",
        ["draws random numbers (aten.bernoulli", "Fix: call model.eval()"]),
    "unsupported-op-forward": (
        lambda: hod.jacobian(uses_zeta)(x), UnsupportedOperatorError,
        "hod.jacobian(uses_zeta)",
        ["no derivative rule for the ATen op aten.special_zeta", "test_errors.py",
         "torch.special.zeta(x + 1.0, 2.0)", "Fix:"]),
    "unsupported-op-reverse": (
        lambda: hod.hessian(uses_zeta_scalar)(x), UnsupportedOperatorError,
        "hod.hessian(uses_zeta_scalar)",
        ["no derivative rule for the ATen op aten.special_zeta",
         "torch.special.zeta(x + 1.0, 2.0).sum()", "Fix:"]),
    "memory-limit": (
        lambda: hod.derivative(torch.sin, 3, memory_limit=1000)(torch.rand(20, dtype=D)),
        MemoryLimitError, "hod.derivative(sin, order=3)",
        ["would allocate a tensor of shape", "over the memory limit of 1000 bytes",
         "Nothing was computed", "memory_limit=<bytes>"]),
    "closure-over-a-grad-tracked-tensor": (
        lambda: grad(lambda W: hod.hessian(lambda x: tanh_loss(x, W))(x).sum())(
            torch.eye(3, dtype=D)),
        TracingError, "hod.hessian(<lambda>)",
        ["uses a tensor from its closure that an enclosing torch.func transform",
         "Fix: pass it as an argument"]),
    "closure-over-a-vmapped-tensor": (
        lambda: vmap(lambda W: hod.hessian(lambda x: tanh_loss(x, W))(x))(
            torch.randn(2, 3, 3, dtype=D)),
        TracingError, "hod.hessian(<lambda>)", ["enclosing torch.func transform"]),
}


@pytest.mark.parametrize("case", CASES)
def test_error_message(case):
    thunk, exception, start, fragments = CASES[case]
    with pytest.raises(exception, match="^" + re.escape(start + ": ")) as info:
        thunk()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{missing} not in:\n{message}"


def test_every_error_is_a_hod_error():
    for exception in (InputError, OutputError, TracingError, UnsupportedOperatorError,
                      MemoryLimitError):
        assert issubclass(exception, hod.HodError)


def test_a_larger_or_no_memory_limit_lets_the_call_through():
    x = torch.rand(20, dtype=D)
    unlimited = hod.derivative(torch.sin, 3, memory_limit=None)(x)
    assert unlimited.shape == (20, 20, 20, 20)
    expected = reference(torch.sin, 3)(x)
    assert_same_tree(unlimited, expected)
    assert_same_tree(hod.derivative(torch.sin, 3, memory_limit=10**7)(x), expected)


@pytest.mark.parametrize("f", [uses_rand, uses_bernoulli, uses_dropout])
def test_allow_random_runs_a_fresh_draw_per_call(f):
    fn = hod.jacobian(f, allow_random=True)
    draws = [fn(x) for _ in range(10)]
    assert all(d.shape == x.shape and torch.isfinite(d).all() for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:]), "the same draw each call"
    assert len(fn._cache) == 1, "a new draw must not retrace"


def test_allow_random_dropout_gradient_is_the_mask_over_keep_probability():
    def f(x):
        return torch.nn.functional.dropout(x, 0.5, training=True).sum()

    g = hod.jacobian(f, allow_random=True)(torch.rand(1000, dtype=D))
    assert set(g.unique().tolist()) <= {0.0, 2.0}
    assert 300 < int((g == 2.0).sum()) < 700


def test_dropout_in_eval_mode_is_deterministic_and_allowed():
    layer = torch.nn.Dropout(0.5).eval()
    assert_same_tree(hod.jacobian(lambda x: layer(x))(x), torch.eye(3, dtype=D))
