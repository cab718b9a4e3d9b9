"""Elementwise ops: unary functions by their derivative towers, binary ops by Leibniz."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext, Jet, Tower
from ._registry import defpointwise_linear, defunary, defzero, register

aten = torch.ops.aten


# -- towers ------------------------------------------------------------------------------
def _polynomial(ctx: DeriveContext, y: fx.Node, coefficients: Sequence[float]) -> Operand:
    """``sum_i c_i y^i`` by Horner's rule; zero coefficients cost nothing."""
    em = ctx.em
    while coefficients and coefficients[-1] == 0:
        coefficients = coefficients[:-1]
    if not coefficients:
        return None
    value: Operand = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        value = em.add(em.mul(value, y), c)
    return value


def _poly_derivative(p: list[float]) -> list[float]:
    return [i * c for i, c in enumerate(p)][1:]


def _poly_mul(p: list[float], q: list[float]) -> list[float]:
    out = [0.0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def polynomial_tower(dy: list[float]):
    """Tower of a ``y = g(x)`` with ``g' = dy(y)`` polynomial: ``g^(j) = P_j(y)``.

    ``P_1 = dy`` and ``P_{j+1} = P_j' * dy`` (tanh: ``1 - y^2``, sigmoid: ``y - y^2``).
    """

    def make(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> Tower:
        polys = [dy]
        while len(polys) < ctx.order:
            polys.append(_poly_mul(_poly_derivative(polys[-1]), dy))
        return lambda j: _polynomial(ctx, y, polys[j - 1])

    return make


def power_tower(p: float):
    """Tower of ``x ** p``: ``p (p-1) ... (p-j+1) x^(p-j)``, zero past an integer ``p``."""

    def make(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> Tower:
        def tower(j: int) -> Operand:
            coefficient = math.prod(p - i for i in range(j))
            return ctx.em.mul(coefficient, _power(ctx, x, p - j))

        return tower

    return make


def _power(ctx: DeriveContext, x: fx.Node, e: float) -> Operand:
    if e == 0:
        return 1
    if e == 1:
        return x
    if e == -1:
        return ctx.em.call(aten.reciprocal.default, x)
    if e == 2:
        return ctx.em.call(aten.mul.Tensor, x, x)
    return ctx.em.call(aten.pow.Tensor_Scalar, x, e)


def _exp_tower(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> Tower:
    return lambda j: y


def _log_tower(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> Tower:
    # d^j/dx^j log x = (-1)^(j-1) (j-1)! x^-j
    return lambda j: ctx.em.mul((-1) ** (j - 1) * math.factorial(j - 1), _power(ctx, x, -j))


def _trig_tower(sin_first: bool):
    """sin: (cos, -sin, -cos, sin, ...); cos: (-sin, -cos, sin, cos, ...)."""

    def make(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> Tower:
        em = ctx.em

        def tower(j: int) -> Operand:
            phase = (j + (0 if sin_first else 1)) % 4
            sin = y if sin_first else em.call(aten.sin.default, x)
            cos = em.call(aten.cos.default, x) if sin_first else y
            return [sin, cos, em.neg(sin), em.neg(cos)][phase]

        return tower

    return make


def _relu_tower(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> Tower:
    # relu'(0) = 0, as torch's threshold_backward; every higher derivative is zero.
    return lambda j: ctx.em.call(aten.gt.Scalar, x, 0) if j == 1 else None


defunary(aten.exp.default, _exp_tower)
defunary(aten.log.default, _log_tower)
defunary(aten.sin.default, _trig_tower(sin_first=True))
defunary(aten.cos.default, _trig_tower(sin_first=False))
defunary(aten.tanh.default, polynomial_tower([1.0, 0.0, -1.0]))
defunary(aten.sigmoid.default, polynomial_tower([0.0, 1.0, -1.0]))
defunary(aten.relu.default, _relu_tower)
defunary(aten.sqrt.default, power_tower(0.5))
defunary(aten.rsqrt.default, power_tower(-0.5))
defunary(aten.reciprocal.default, power_tower(-1.0))


@register(aten.pow.Tensor_Scalar)
def _pow_scalar(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, p = args
    return ctx.unary(x, power_tower(float(p))(ctx, x.primal, out))


defpointwise_linear(
    aten.neg.default, aten.clone.default, aten.alias.default, aten.mul.Scalar, aten.div.Scalar
)


@register(aten.add.Scalar, aten.sub.Scalar)
def _shift(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return ctx.linear(args[0], lambda t, k: t)


@register(aten.rsub.Scalar)
def _rsub(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    return ctx.linear(args[0], lambda t, k: ctx.em.mul(-alpha, t))
defzero(
    aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default,
    aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default,
)


# -- binary ops ---------------------------------------------------------------------------
def as_jet(ctx: DeriveContext, value) -> Jet:
    """A Jet for an operand that may be a Python number (a constant)."""
    if isinstance(value, Jet):
        return value
    return Jet(value, [None] * ctx.order)


def _combine(ctx: DeriveContext, out: fx.Node, a, b, scale_b: float) -> list[Operand]:
    """Derivatives of ``a + scale_b * b`` aligned to ``out``'s rank."""
    em, rank = ctx.em, ctx.em.rank(out)
    a, b = as_jet(ctx, a), as_jet(ctx, b)
    return [
        em.add(ctx.align(a.d(k), k, rank), em.mul(scale_b, ctx.align(b.d(k), k, rank)))
        for k in range(1, ctx.order + 1)
    ]


@register(aten.add.Tensor)
def _add(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return _combine(ctx, out, args[0], args[1], kwargs.get("alpha", 1))


@register(aten.sub.Tensor)
def _sub(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return _combine(ctx, out, args[0], args[1], -kwargs.get("alpha", 1))


@register(aten.mul.Tensor)
def _mul(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    a, b = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    return ctx.bilinear(a, b, ctx.em.mul, rank=ctx.em.rank(out))


@register(aten.div.Tensor)
def _div(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    a, b = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    em, rank = ctx.em, ctx.em.rank(out)
    if b.is_constant:
        return [
            None if a.d(k) is None else em.call(aten.div.Tensor, ctx.align(a.d(k), k, rank), b.primal)
            for k in range(1, ctx.order + 1)
        ]
    inverse = em.call(aten.reciprocal.default, b.primal)
    inverse_jet = Jet(inverse, ctx.unary(b, power_tower(-1.0)(ctx, b.primal, inverse)))
    return ctx.bilinear(a, inverse_jet, em.mul, rank=rank)


@register(aten.where.self)
def _where(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    condition, a, b = args[0].primal, as_jet(ctx, args[1]), as_jet(ctx, args[2])
    em, rank = ctx.em, ctx.em.rank(out)
    derivs: list[Operand] = []
    for k in range(1, ctx.order + 1):
        da, db = ctx.align(a.d(k), k, rank), ctx.align(b.d(k), k, rank)
        if da is None and db is None:
            derivs.append(None)
        elif db is None:
            derivs.append(em.call(aten.where.ScalarOther, condition, da, 0.0))
        elif da is None:
            derivs.append(em.call(aten.where.ScalarSelf, condition, 0.0, db))
        else:
            derivs.append(em.call(aten.where.self, condition, da, db))
    return derivs
