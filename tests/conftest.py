"""Shared helpers: the torch.func reference (and its Taylor-mode form, for ``hod.jet``), a
structural comparison that refuses a reference of zeros, and the ``--runslow`` option."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacfwd, jacrev
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

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


def scaled_weights(*sizes: int) -> list[torch.Tensor]:
    """Float64 matrices ``(a, b)`` for consecutive ``sizes``, entries of variance ``1 / a``,
    drawn from a seed of the sizes (the same weights on every import)."""
    torch.manual_seed(sum(sizes))
    return [torch.randn(a, b, dtype=torch.float64) / a**0.5
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)]


def layer(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``x @ W`` with ``W`` cast to ``x``'s dtype (a float32 case reuses float64 weights)."""
    return x @ W.to(x.dtype)


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


def taylor_path(f, primals: tuple, series, argnums=0):
    """``g(t) = f`` at ``x(t) = x + sum_k s_k t^k / k!`` for each differentiated argument.

    ``series`` is as ``hod.jet`` takes it: one entry per differentiated argument (a tuple
    of entries when ``argnums`` is a tuple); an entry is a direction shaped like the primal
    (a pytree like it), or a tuple of such coefficients ``(s_1, ..., s_k)``. ``g`` takes a
    0-dim tensor ``t``.
    """
    positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    entries = (series,) if isinstance(argnums, int) else tuple(series)

    def g(t: torch.Tensor):
        args = list(primals)
        for i, entry in zip(positions, entries, strict=True):
            coefficients = entry if isinstance(entry, tuple) else (entry,)
            args[i] = tree_map(lambda x, *s: _polynomial(x, s, t), primals[i], *coefficients)
        return f(*args)

    return g


def _polynomial(x: torch.Tensor, coefficients, t: torch.Tensor) -> torch.Tensor:
    """``x + sum_k s_k t^k / k!`` by Horner's rule (products only: no pow at t = 0)."""
    acc = torch.zeros_like(x)
    for k in range(len(coefficients), 0, -1):
        acc = (acc + coefficients[k - 1] / math.factorial(k)) * t
    return x + acc


def jet_reference(f, order: int, argnums=0):
    """``(primals, series) -> (f(primals), (c_1, ..., c_order))``, ``c_k = d^k/dt^k g(t)`` at
    ``t = 0`` for :func:`taylor_path`'s ``g``, by ``k`` nested ``torch.func.jvp`` over the
    scalar ``t`` (forward mode only, no vmap): the contract of ``hod.jet``."""

    def jf(primals: tuple, series):
        g = taylor_path(f, primals, series, argnums)
        leaf = tree_flatten(primals)[0][0]
        t = torch.zeros((), dtype=leaf.dtype, device=leaf.device)
        coefficients, derivative = [], g
        for _ in range(order):
            derivative = _along_t(derivative)
            coefficients.append(derivative(t))
        return g(t), tuple(coefficients)

    return jf


def _along_t(h):
    return lambda t: torch.func.jvp(h, (t,), (torch.ones_like(t),))[1]


def assert_same_jets(actual: list, expected: list, rtol: float = 1e-9, atol: float = 1e-9,
                     vanishes=lambda k: False) -> None:
    """Lists of jets ``(value, (c_1, ..., c_n))`` (one per sample) compared order by order
    with :func:`assert_same_tree`, so that each order's reference is refused on its own if
    it is (nearly) zero, unless ``vanishes(k)`` says the k-th coefficient (the value when
    ``k = 0``) must be zero."""
    spec_a, spec_e = tree_flatten(actual)[1], tree_flatten(expected)[1]
    assert spec_a == spec_e, f"structure differs:\n{spec_a}\n!=\n{spec_e}"
    assert_same_tree([a[0] for a in actual], [e[0] for e in expected], rtol=rtol, atol=atol,
                     expect_zero=vanishes(0))
    for k in range(1, len(expected[0][1]) + 1):
        assert_same_tree([a[1][k - 1] for a in actual], [e[1][k - 1] for e in expected],
                         rtol=rtol, atol=atol, expect_zero=vanishes(k))


def _flat_inputs(f, args: tuple, argnums=0):
    """``(g, z)``: ``g(z) = f(args)`` with the differentiated arguments' leaves (in
    ``tree_flatten`` order, each flattened) read from the vector ``z``."""
    positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    leaves, spec = tree_flatten([args[i] for i in positions])
    sizes = [leaf.numel() for leaf in leaves]

    def g(z):
        pieces = [p.reshape(leaf.shape) for p, leaf in zip(z.split(sizes), leaves, strict=True)]
        replaced = list(args)
        for i, value in zip(positions, tree_unflatten(pieces, spec), strict=True):
            replaced[i] = value
        return f(*replaced)

    return g, torch.cat([leaf.reshape(-1) for leaf in leaves])


def flat_reference(f, args: tuple, order: int, argnums=0):
    """:func:`reference`'s ``order``-th derivative at ``args`` over the differentiated
    entries flattened into one vector of ``n`` (arguments in positional order): a tree like
    ``f``'s output, each leaf of shape ``out.shape + (n,) * order``."""
    g, z = _flat_inputs(f, args, argnums)
    return reference(g, order)(z)


def exact_laplacian(f, args: tuple, argnums=0):
    """The trace of the flat Hessian, per output entry (a tree like ``f``'s output)."""
    return tree_map(lambda H: H.diagonal(dim1=-2, dim2=-1).sum(-1),
                    flat_reference(f, args, 2, argnums))


def exact_biharmonic(f, args: tuple, argnums=0):
    """``sum_ij T_iijj`` of the flat fourth derivative ``T``, per output entry."""
    return tree_map(lambda T: torch.einsum("...iijj->...", T),
                    flat_reference(f, args, 4, argnums))
