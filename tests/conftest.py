"""Shared helpers: the torch.func reference, a structural comparison that refuses a
reference of zeros, and the ``--runslow`` option."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacfwd, jacrev
from torch.utils._pytree import tree_flatten, tree_map

pytest_plugins = ["pytester"]

#: Unless a test expects zero, a result of zeros must miss the tolerance by this factor.
ZERO_MISS_FACTOR = 2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False,
        help="run the tests marked slow too, even when -m leaves them out "
        '(-m "not slow" --runslow runs everything)',
    )


def pytest_configure(config: pytest.Config) -> None:
    expression = config.option.markexpr
    if config.getoption("--runslow") and expression:
        config.option.markexpr = f"({expression}) or slow"


#: dtype: (rtol, atol) of a result against the float64 reference rounded to that dtype.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 1e-1),
}


def cast(tree, dtype: torch.dtype):
    """``tree`` with every floating-point tensor leaf converted to ``dtype``."""
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        tree,
    )


def reference(f, order: int, argnums=0, has_aux: bool = False):
    """``jacrev(f, argnums)`` wrapped in ``order - 1`` ``jacfwd``: the contract."""
    g = jacrev(f, argnums, has_aux=has_aux)
    for _ in range(order - 1):
        g = jacfwd(g, argnums, has_aux=has_aux)
    return g


def assert_same_tree(
    actual, expected, rtol: float = 1e-9, atol: float = 1e-9, expect_zero: bool = False
) -> None:
    """Same pytree structure, and every leaf equal in shape, dtype and value.

    A comparison with a reference of zeros, or of entries within the tolerance of zero,
    cannot tell right code from code that returns zeros (the seed MLP's derivatives are all
    zero: its softmax rows sum to one). So the reference's largest entry ``m`` must be such
    that a result of zeros misses the tolerance by ``ZERO_MISS_FACTOR``:
    ``m > ZERO_MISS_FACTOR * (atol + rtol * m)``. A test whose reference is zero by design
    says so with ``expect_zero=True``, and then every entry must be within ``atol`` of zero.
    """
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
    largest = max((_largest(e) for e in leaves_e), default=0.0)
    if expect_zero:
        assert largest <= atol, f"a zero reference was expected, its largest entry is {largest}"
    else:
        assert largest > ZERO_MISS_FACTOR * (atol + rtol * largest), (
            f"the reference is (nearly) zero: its largest entry is {largest}, at atol={atol}, "
            f"rtol={rtol}; a result of zeros would (nearly) pass. Use a model whose "
            "derivative is not zero, or pass expect_zero=True."
        )


def _largest(t: torch.Tensor) -> float:
    wide = torch.complex128 if t.is_complex() else torch.float64
    return float(t.detach().to(wide).abs().max()) if t.numel() else 0.0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
