"""Activation functions that reach the graph undecomposed.

Piecewise-linear ones follow torch's choice of derivative at their kinks (the one its
backward formulas make); ELU and GELU have towers. ``silu``, ``mish``, ``softplus`` and
``logsigmoid`` arrive decomposed into elementwise ops (``celu`` into ``elu``).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext
from ._registry import register
from .elementwise import ChainTower, Poly, defslope

aten = torch.ops.aten


def _leaky_relu_slope(ctx: DeriveContext, x: fx.Node, negative_slope: float = 0.01) -> Operand:
    em = ctx.em
    return em.call(
        aten.where.self, em.call(aten.gt.Scalar, x, 0),
        em.full_scalar(1.0, x), em.full_scalar(negative_slope, x),
    )


def _hardtanh_slope(ctx: DeriveContext, x: fx.Node, low: float = -1.0, high: float = 1.0):
    """1 strictly inside ``(low, high)``: unlike clamp, torch's hardtanh stops at the bounds."""
    em = ctx.em
    return em.call(
        aten.logical_and.default, em.call(aten.gt.Scalar, x, low), em.call(aten.lt.Scalar, x, high)
    )


# relu'(0) = 0, as torch's threshold_backward.
defslope(aten.relu.default, lambda ctx, x: ctx.em.call(aten.gt.Scalar, x, 0))
defslope(aten.leaky_relu.default, _leaky_relu_slope)
defslope(aten.hardtanh.default, _hardtanh_slope)


@register(aten.elu.default)
def _elu(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """``scale * x`` for ``x > 0``, else ``alpha * scale * expm1(input_scale * x)``.

    At ``x = 0`` torch's first derivative takes the exponential branch and its higher ones
    the linear branch (``elu_double_backward`` masks with ``x < 0``); so does this rule.
    """
    x = args[0]
    alpha, scale, input_scale = [*args[1:], 1.0, 1.0, 1.0][:3]
    em = ctx.em
    exp = em.call(aten.exp.default, em.mul(x.primal, input_scale))
    positive = em.call(aten.gt.Scalar, x.primal, 0)
    negative = em.call(aten.lt.Scalar, x.primal, 0)

    def tower(j: int) -> Operand:
        branch = em.mul(alpha * scale * input_scale**j, exp)
        if j == 1:
            return em.call(aten.where.self, positive, em.full_scalar(scale, x.primal), branch)
        return em.call(aten.where.ScalarOther, negative, branch, 0.0)

    return ctx.unary(x, tower)


def _gelu_erf() -> ChainTower:
    """``x Phi(x)``: generators ``x``, ``Phi(x)`` and ``e = exp(-x^2 / 2)``."""
    u, cdf, e = Poly.variables(3)
    density = e * (1 / math.sqrt(2 * math.pi))

    def generators(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> list[Operand]:
        em = ctx.em
        erf = em.call(aten.erf.default, em.mul(x, 1 / math.sqrt(2)))
        gaussian = em.call(aten.exp.default, em.mul(em.mul(x, x), -0.5))
        return [x, em.mul(em.add(erf, 1.0), 0.5), gaussian]

    return ChainTower(generators, (u.lift(1.0), density, -u * e), cdf + u * density)


def _gelu_tanh() -> ChainTower:
    """``x (1 + tanh(k (x + c x^3))) / 2``: generators ``x`` and the tanh ``t``."""
    k, c = math.sqrt(2 / math.pi), 0.044715
    u, t = Poly.variables(2)
    dt = (1.0 - t**2) * (k + 3 * k * c * u**2)

    def generators(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> list[Operand]:
        em = ctx.em
        inner = em.mul(em.add(x, em.mul(c, em.call(aten.pow.Tensor_Scalar, x, 3))), k)
        return [x, em.call(aten.tanh.default, inner)]

    return ChainTower(generators, (u.lift(1.0), dt), 0.5 * (1.0 + t) + 0.5 * u * dt)


_GELU = {"none": _gelu_erf(), "tanh": _gelu_tanh()}


@register(aten.gelu.default)
def _gelu(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x = args[0]
    tower = _GELU[kwargs.get("approximate", args[1] if len(args) > 1 else "none")]
    return ctx.unary(x, tower(ctx, x.primal, out))


@register(aten.threshold_backward.default)
def _threshold_backward(
    ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node
) -> list[Operand]:
    """``where(x <= threshold, 0, grad)``: linear in ``grad``; ``x`` only picks entries."""
    grad, x, threshold = args
    return ctx.linear(
        grad, lambda t, k: ctx.em.call(aten.threshold_backward.default, t, x.primal, threshold)
    )
