"""Shared helpers: the torch.func reference and a structural comparison."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacfwd, jacrev
from torch.utils._pytree import tree_flatten


def reference(f, order: int, argnums=0, has_aux: bool = False):
    """``jacrev(f, argnums)`` wrapped in ``order - 1`` ``jacfwd``: the contract."""
    g = jacrev(f, argnums, has_aux=has_aux)
    for _ in range(order - 1):
        g = jacfwd(g, argnums, has_aux=has_aux)
    return g


def assert_same_tree(actual, expected, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    """Same pytree structure, and every leaf equal in shape, dtype and value."""
    leaves_a, spec_a = tree_flatten(actual)
    leaves_e, spec_e = tree_flatten(expected)
    assert spec_a == spec_e, f"structure differs:\n{spec_a}\n!=\n{spec_e}"
    for i, (a, e) in enumerate(zip(leaves_a, leaves_e, strict=True)):
        assert isinstance(a, torch.Tensor), f"leaf {i} is {type(a)}"
        assert a.shape == e.shape, f"leaf {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"leaf {i}: dtype {a.dtype} != {e.dtype}"
        torch.testing.assert_close(
            a, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"leaf {i}: {m}"
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
