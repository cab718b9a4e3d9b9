"""Every error a user can cause in Taylor mode (``hod.jet``, ``hod.hvp``, ``hod.laplacian``,
``hod.biharmonic``, ``hod.operator``): an ``InputError`` whose message starts with the call,
names what came (the shape, dtype, device, length, number or position) and says how to fix
it; nothing is computed."""

from __future__ import annotations

import re

import pytest
import torch

import hod
from hod import InputError

D = torch.float64
x = torch.rand(3, dtype=D) + 0.5


def two_args(a, b):
    return (a * b).sum()


def square(x):
    return (x**2).sum()


def wrong_weights(x):
    return torch.eye(2, dtype=D)


FIX = "Fix:"

# id: (thunk, message start, fragments the message must contain)
CASES = {
    # -- directions and series --------------------------------------------------------------
    "direction-shape": (
        lambda: hod.jet(torch.sin, 2)((x,), torch.rand(4, dtype=D)), "hod.jet(sin, order=2)",
        ["has shape (4,) where the argument has (3,)", "randn_like", FIX]),
    "direction-dtype": (
        lambda: hod.jet(torch.sin, 2)((x,), torch.rand(3)), "hod.jet(sin, order=2)",
        ["dtype torch.float32 where the argument has torch.float64", FIX]),
    "direction-device": (
        lambda: hod.jet(torch.sin, 2)((x,), torch.rand(3, dtype=D, device="meta")),
        "hod.jet(sin, order=2)", ["device meta where the argument has cpu", "v.to(x)"]),
    "series-coefficient-shape": (
        lambda: hod.jet(torch.sin, 3)((x,), (x, torch.rand(2, dtype=D))),
        "hod.jet(sin, order=3)", ["coefficient 2", "shape (2,) where the argument has (3,)",
                                  FIX]),
    "series-longer-than-order": (
        lambda: hod.jet(torch.sin, 2)((x,), (x, x, x)), "hod.jet(sin, order=2)",
        ["has 3 coefficients, more than order=2", "at most 2", FIX]),
    "series-not-a-tuple-for-tuple-argnums": (
        lambda: hod.jet(two_args, 2, argnums=(0, 1))((x, x), x),
        "hod.jet(two_args, order=2, argnums=(0, 1))",
        ["one entry per differentiated argument", "a tuple of 2 entries", FIX]),
    "primals-not-a-tuple": (
        lambda: hod.jet(torch.sin, 2)(x, x), "hod.jet(sin, order=2)",
        ["primals must be a tuple", "got Tensor", "pass (x,)"]),
    "tangent-shape": (
        lambda: hod.hvp(square)((x,), torch.rand(2, dtype=D)), "hod.hvp(square)",
        ["tangents", "shape (2,) where the argument has (3,)", FIX]),
    "tangent-dtype": (
        lambda: hod.hvp(square)((x,), torch.rand(3)), "hod.hvp(square)",
        ["dtype torch.float32 where the argument has torch.float64", FIX]),
    # -- orders -----------------------------------------------------------------------------
    "order-zero": (
        lambda: hod.jet(torch.sin, 0), "hod.jet(sin, order=0)",
        ["positive integer, got 0", FIX]),
    "order-negative": (
        lambda: hod.jet(torch.sin, -1), "hod.jet(sin, order=-1)",
        ["positive integer, got -1", FIX]),
    "order-float": (
        lambda: hod.jet(torch.sin, 2.0), "hod.jet(sin, order=2.0)",
        ["positive integer, got 2.0", FIX]),
    # -- non-floating inputs ----------------------------------------------------------------
    "jet-int-input": (
        lambda: hod.jet(torch.sin, 2)((torch.arange(3),), torch.ones(3)), "hod.jet(sin, order=2)",
        ["torch.int64", "floating-point", FIX]),
    "hvp-bool-input": (
        lambda: hod.hvp(square)((torch.ones(3, dtype=torch.bool),), torch.ones(3)),
        "hod.hvp(square)", ["torch.bool", "floating-point", FIX]),
    "laplacian-int-input": (
        lambda: hod.laplacian(square)(torch.arange(3)), "hod.laplacian(square)",
        ["torch.int64", "floating-point", FIX]),
    "biharmonic-complex-input": (
        lambda: hod.biharmonic(lambda z: z.abs().sum())(torch.ones(3, dtype=torch.complex128)),
        "hod.biharmonic(<lambda>)", ["torch.complex128", "floating-point", FIX]),
    "operator-number-input": (
        lambda: hod.operator(square, {(0, 0): 1.0})(3.0), "hod.operator(square)",
        ["float", FIX]),
    # -- sampling ---------------------------------------------------------------------------
    "samples-zero": (
        lambda: hod.laplacian(square, samples=0), "hod.laplacian(square)",
        ["samples must be a positive integer or None", "got 0", FIX]),
    "samples-negative": (
        lambda: hod.biharmonic(square, samples=-3), "hod.biharmonic(square)",
        ["samples must be a positive integer or None", "got -3", FIX]),
    "samples-float": (
        lambda: hod.laplacian(square, samples=2.5), "hod.laplacian(square)", ["got 2.5", FIX]),
    "distribution-unknown": (
        lambda: hod.laplacian(square, samples=2, distribution="uniform"),
        "hod.laplacian(square)", ["'rademacher', 'normal'", "got 'uniform'", FIX]),
    "biharmonic-rademacher": (
        lambda: hod.biharmonic(square, samples=2, distribution="rademacher"),
        "hod.biharmonic(square)", ["got 'rademacher'", "distribution='normal'"]),
    "generator-not-a-generator": (
        lambda: hod.laplacian(square, samples=2, generator=3), "hod.laplacian(square)",
        ["torch.Generator", "got int", "manual_seed"]),
    # -- weights ----------------------------------------------------------------------------
    "weights-shape": (
        lambda: hod.laplacian(square, weights=torch.eye(2, dtype=D))(x),
        "hod.laplacian(square)", ["(3, 3) tensor over the 3 differentiated entries",
                                  "got (2, 2)", FIX]),
    "weights-callable-shape": (
        lambda: hod.laplacian(square, weights=wrong_weights)(x), "hod.laplacian(square)",
        ["got (2, 2)", FIX]),
    "weights-with-samples": (
        lambda: hod.laplacian(square, weights=torch.eye(3, dtype=D), samples=2),
        "hod.laplacian(square)", ["cannot be combined", FIX]),
    # -- operator terms ---------------------------------------------------------------------
    "terms-position-out-of-range": (
        lambda: hod.operator(square, {(0, 5): 1.0})(x), "hod.operator(square)",
        ["position 5", "have 3 entries (positions 0..2)", FIX]),
    "terms-position-out-of-range-over-two-arguments": (
        lambda: hod.operator(two_args, {(6,): 1.0}, argnums=(0, 1))(x, x),
        "hod.operator(two_args, argnums=(0, 1))", ["position 6", "6 entries", FIX]),
    "terms-order-five": (
        lambda: hod.operator(square, {(0, 0, 0, 0, 0): 1.0}), "hod.operator(square)",
        ["1 to 4", "got (0, 0, 0, 0, 0)", "orders above 4"]),
    "terms-order-zero": (
        lambda: hod.operator(square, {(): 1.0}), "hod.operator(square)",
        ["1 to 4", "got ()", FIX]),
    "terms-negative-position": (
        lambda: hod.operator(square, {(-1,): 1.0}), "hod.operator(square)",
        ["non-negative", "got (-1,)", FIX]),
    "terms-empty": (
        lambda: hod.operator(square, {}), "hod.operator(square)",
        ["non-empty dict", "got {}", FIX]),
    "terms-coefficient-not-a-number": (
        lambda: hod.operator(square, {(0,): "a"}), "hod.operator(square)",
        ["coefficient of (0,) must be a number, got str", FIX]),
    # -- argnums ----------------------------------------------------------------------------
    "argnums-out-of-range": (
        lambda: hod.laplacian(square, argnums=3)(x), "hod.laplacian(square, argnums=3)",
        ["positional argument 3", "passed 1 positional argument(s)", FIX]),
}


@pytest.mark.parametrize("case", CASES)
def test_error_message(case):
    thunk, start, fragments = CASES[case]
    with pytest.raises(InputError, match="^" + re.escape(start + ": ")) as info:
        thunk()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{missing} not in:\n{message}"

