"""Results keep the input dtype and device; low precision is checked against float64."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, reference
from models import tanh_loss, vector_valued

import hod


def check_against_float64(fn_of, f, order, args, dtype, device="cpu"):
    """``fn_of(f, order)`` on ``args`` cast to ``dtype``/``device`` vs the float64 reference."""
    cast = [a.to(dtype=dtype, device=device) for a in args]
    actual = fn_of(f, order)(*cast)
    expected = reference(f, order)(*[a.double() for a in args])
    leaves = actual if isinstance(actual, tuple) else (actual,)
    for leaf in leaves:
        assert leaf.dtype == dtype and leaf.device.type == torch.device(device).type
    rtol, atol = TOLERANCES[dtype]
    assert_same_tree(
        actual, expected.to(dtype=dtype, device=device), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("dtype", TOLERANCES, ids=str)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_loss_derivatives_keep_dtype(dtype, order):
    args = (torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    check_against_float64(hod.derivative, tanh_loss, order, args, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_vector_valued_second_derivative_keeps_dtype(dtype):
    args = (torch.rand(4, dtype=torch.float64),)
    check_against_float64(hod.derivative, vector_valued, 2, args, dtype)


def test_mixed_dtypes_match_torch_func():
    def f(x, y):
        return (torch.sin(x) * y).sum()

    x, y = torch.randn(3, dtype=torch.float32), torch.randn(3, dtype=torch.float64)
    actual = hod.hessian(f, (0, 1))(x, y)
    assert_same_tree(actual, torch.func.hessian(f, (0, 1))(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_cuda_results_stay_on_the_device(dtype, order):
    args = (torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    check_against_float64(hod.derivative, tanh_loss, order, args, dtype, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_function_serves_cpu_and_cuda():
    fn = hod.hessian(tanh_loss)
    x, W = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    on_cpu = fn(x, W)
    on_cuda = fn(x.cuda(), W.cuda())
    assert on_cuda.device.type == "cuda" and len(fn._cache) == 2
    assert_same_tree(on_cuda.cpu(), on_cpu)
