"""Reductions at their corners, against nested torch.func: the extreme of a 0-dim tensor
(nothing to reduce) and a cumulative sum with a ``dtype``. Found by the mutation run
(issue 21): rules that dropped the derivatives of a 0-dim extreme passed every test."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_tree, reference

import hod

D = torch.float64


@pytest.mark.parametrize("extreme", [torch.max, torch.min, torch.amax, torch.amin])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_the_extreme_of_a_0_dim_tensor(extreme, order: int):
    def f(x):
        return extreme(torch.tanh(x).sum() * x[0]) * x[1]

    x = torch.randn(3, dtype=D)
    assert_same_tree(hod.derivative(f, order)(x), reference(f, order)(x))


@pytest.mark.parametrize("order", [1, 2])
def test_cumsum_with_a_dtype(order: int):
    def f(x):
        return torch.cumsum(torch.sin(x), 0, dtype=D).pow(2).sum(0)

    x = torch.randn(4, 2, dtype=torch.float32)
    assert_same_tree(hod.derivative(f, order)(x), reference(f, order)(x), rtol=1e-4, atol=1e-5)
