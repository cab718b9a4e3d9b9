"""Average pooling inside nonlinear models, against nested torch.func in float64.

Found by the mutation run (issue 21). The op database pools one image and sums, so a fold
of the wrong leading dims before pooling passed; and ``avg_pool2d_backward``'s rule is
live only when ``f`` itself holds a gradient (hod's reverse sweep does not derive it), which
no test did, so rules reading the wrong argument of ``avg_pool2d_backward`` passed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_tree, reference

import hod

D = torch.float64


def pooled_2d(x: torch.Tensor) -> torch.Tensor:
    """A batch of images (N, C, H, W), pooled then squashed."""
    y = F.avg_pool2d(torch.sin(x), 2, stride=1, padding=1, count_include_pad=False)
    return (torch.tanh(y) ** 2).sum()


def pooled_1d(x: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(F.avg_pool1d(x * x, 2)) ** 2).sum()


@pytest.mark.parametrize("order", [2, 3])
def test_avg_pool2d_in_a_nonlinear_model(order: int):
    x = torch.randn(2, 2, 3, 3, dtype=D)
    assert_same_tree(hod.derivative(pooled_2d, order)(x), reference(pooled_2d, order)(x))


@pytest.mark.parametrize("order", [2, 3])
def test_avg_pool1d_in_a_nonlinear_model(order: int):
    x = torch.randn(2, 2, 6, dtype=D)
    assert_same_tree(hod.derivative(pooled_1d, order)(x), reference(pooled_1d, order)(x))


def test_avg_pool2d_vector_output_at_order_2():
    """Forward mode: the pooled derivative carries two seed dims before (N, C, H, W)."""

    def f(x):
        return torch.tanh(F.avg_pool2d(x, 2)).flatten()[:5]

    x = torch.randn(2, 2, 4, 4, dtype=D)
    assert_same_tree(hod.derivative(f, 2)(x), reference(f, 2)(x))


@pytest.mark.parametrize("order", [1, 2])
def test_derivatives_of_a_pooled_gradient(order: int):
    """``f`` is a gradient: its graph holds ``avg_pool2d_backward`` with a ``grad_output``
    that depends on x, derived in forward mode."""

    def gradient(x):
        return torch.func.grad(pooled_2d)(x)

    x = torch.randn(2, 2, 3, 3, dtype=D)
    assert_same_tree(hod.derivative(gradient, order)(x), reference(gradient, order)(x))
