"""Elementwise ops: unary functions by their derivative towers, binary ops by Leibniz.

Most towers are :class:`ChainTower`\\ s: a few *generator* values ``u`` (``tanh(x)``, or
``x`` and ``1 / (1 + x^2)``) whose derivatives are polynomials in themselves, so every
``g^(j)`` is a polynomial in ``u`` found by differentiating the previous one symbolically
at trace time and emitted as a handful of elementwise ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext, Tower
from .._records import Jet
from ._registry import defpointwise_linear, defunary, defzero, register

aten = torch.ops.aten

Exponents = tuple[int, ...]


def as_jet(ctx: DeriveContext, value) -> Jet:
    """A Jet for an operand that may be a Python number (a constant)."""
    if isinstance(value, Jet):
        return value
    return Jet(value, [None] * ctx.order)


# -- polynomials in generator values --------------------------------------------------------
class Poly:
    """A polynomial with float coefficients in ``rank`` variables (generator values)."""

    def __init__(self, terms: dict[Exponents, float], rank: int) -> None:
        self.terms = {e: c for e, c in terms.items() if c != 0}
        self.rank = rank

    @staticmethod
    def variables(rank: int) -> list[Poly]:
        return [Poly({tuple(int(i == j) for j in range(rank)): 1.0}, rank) for i in range(rank)]

    def lift(self, other: Poly | float) -> Poly:
        """``other`` as a polynomial in the same variables."""
        return other if isinstance(other, Poly) else Poly({(0,) * self.rank: other}, self.rank)

    def __add__(self, other: Poly | float) -> Poly:
        terms = dict(self.terms)
        for e, c in self.lift(other).terms.items():
            terms[e] = terms.get(e, 0.0) + c
        return Poly(terms, self.rank)

    def __mul__(self, other: Poly | float) -> Poly:
        terms: dict[Exponents, float] = {}
        for e1, c1 in self.terms.items():
            for e2, c2 in self.lift(other).terms.items():
                e = tuple(a + b for a, b in zip(e1, e2, strict=True))
                terms[e] = terms.get(e, 0.0) + c1 * c2
        return Poly(terms, self.rank)

    def __neg__(self) -> Poly:
        return self * -1.0

    def __sub__(self, other: Poly | float) -> Poly:
        return self + -self.lift(other)

    def __rsub__(self, other: float) -> Poly:
        return -self + other

    __radd__ = __add__
    __rmul__ = __mul__

    def __pow__(self, n: int) -> Poly:
        result = self.lift(1.0)
        for _ in range(n):
            result = result * self
        return result

    def partial(self, i: int) -> Poly:
        """``d/du_i``."""
        terms: dict[Exponents, float] = {}
        for e, c in self.terms.items():
            if e[i]:
                lowered = e[:i] + (e[i] - 1,) + e[i + 1:]
                terms[lowered] = terms.get(lowered, 0.0) + c * e[i]
        return Poly(terms, self.rank)

    def chain(self, slopes: Sequence[Poly]) -> Poly:
        """``d/dx`` when ``du_i/dx = slopes[i]``."""
        total = Poly({}, self.rank)
        for i, slope in enumerate(slopes):
            total = total + self.partial(i) * slope
        return total


def _evaluate(ctx: DeriveContext, poly: Poly, values: Sequence[Operand]) -> Operand:
    """Emit ``poly`` at the generator ``values``."""
    em = ctx.em
    terms = []
    for exponents, c in poly.terms.items():
        factors = [_power(ctx, v, e) for v, e in zip(values, exponents, strict=True)]
        terms.append(em.mul(c, em.product(factors)))
    return em.sum_terms(terms)


Generators = Callable[[DeriveContext, fx.Node, fx.Node], list[Operand]]


@dataclass(frozen=True)
class ChainTower:
    """Tower of ``y = g(x)`` from generators ``u = generators(ctx, x, y)``.

    ``du_i/dx = slopes[i](u)`` and ``g' = first(u)`` are polynomials in ``u``, hence so
    is every ``g^(j+1) = d g^(j) / dx``. Calling it gives the tower at ``x``.
    """

    generators: Generators
    slopes: tuple[Poly, ...]
    first: Poly

    def __call__(self, ctx: DeriveContext, x: fx.Node, y: fx.Node) -> Tower:
        polys = [self.first]
        while len(polys) < ctx.order:
            polys.append(polys[-1].chain(self.slopes))
        values = self.generators(ctx, x, y)
        return lambda j: _evaluate(ctx, polys[j - 1], values)


def self_tower(slope: Callable[[Poly], Poly | float]) -> ChainTower:
    """``g' = slope(g)`` (exp: ``y``, tanh: ``1 - y^2``, tan: ``1 + y^2``)."""
    (u,) = Poly.variables(1)
    s = u.lift(slope(u))
    return ChainTower(lambda ctx, x, y: [y], (s,), s)


def _pair_tower(first: str, second: str, sign: float, derivative_index: int) -> ChainTower:
    """sin/cos and sinh/cosh: generators ``(f(x), h(x))`` with ``f' = h``, ``h' = sign f``."""
    f, h = Poly.variables(2)
    ops = (getattr(aten, first).default, getattr(aten, second).default)
    slopes = (h, sign * f)
    return ChainTower(
        lambda ctx, x, y: [ctx.em.call(op, x) for op in ops], slopes, slopes[derivative_index]
    )


def _reciprocal_tower(shift: float, scale: float) -> ChainTower:
    """``g' = scale / (x + shift)`` (the log family), generator ``r = 1 / (x + shift)``."""
    (r,) = Poly.variables(1)
    return ChainTower(
        lambda ctx, x, y: [_power(ctx, ctx.em.add(x, shift), -1)], (-(r**2),), scale * r
    )


def _inverse_tower(a: float, b: float, p: float, sign: float) -> ChainTower:
    """``g' = sign * (a + b x^2)^p`` (atan, asin, acosh, ...), generators ``x`` and ``s = g'``.

    ``ds/dx = 2 p b x (a + b x^2)^(p-1) = 2 p b x s^(1 - 1/p)`` for ``p`` in ``{-1, -1/2}``.
    """
    u, s = Poly.variables(2)

    def generators(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> list[Operand]:
        em = ctx.em
        return [x, _power(ctx, em.add(em.mul(b, em.mul(x, x)), a), p)]

    return ChainTower(generators, (u.lift(1.0), 2 * p * b * u * s ** round(1 - 1 / p)), sign * s)


def _gaussian_tower(scale: float) -> ChainTower:
    """``g' = scale * exp(-x^2)`` (erf, erfc), generators ``x`` and ``e = exp(-x^2)``."""
    u, e = Poly.variables(2)

    def generators(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> list[Operand]:
        em = ctx.em
        return [x, em.call(aten.exp.default, em.neg(em.mul(x, x)))]

    return ChainTower(generators, (u.lift(1.0), -2 * u * e), scale * e)


def exponential_tower(log_base: float) -> ChainTower:
    """``g = base^x``: ``g' = log(base) g``."""
    return self_tower(lambda y: log_base * y)


# -- towers in closed form ------------------------------------------------------------------
def power_tower(p: Operand):
    """Tower of ``x ** p`` (``p`` a number or a node): ``p (p-1) ... (p-j+1) x^(p-j)``.

    A falling factorial that reaches zero (integer ``p``) makes the rest symbolic zeros.
    """

    def make(ctx: DeriveContext, x: fx.Node, y: fx.Node) -> Tower:
        em = ctx.em

        def tower(j: int) -> Operand:
            coefficient = em.product([em.add(p, -i) for i in range(j)])
            return em.mul(coefficient, _power(ctx, x, em.add(p, -j)))

        return tower

    return make


def _power(ctx: DeriveContext, x: Operand, e: Operand) -> Operand:
    """``x ** e`` with the cheap special cases of a numeric ``e``."""
    em = ctx.em
    if isinstance(e, fx.Node):
        return em.call(aten.pow.Tensor_Tensor, x, e)
    if e == 0:
        return 1
    if e == 1 or not isinstance(x, fx.Node):
        return x if e == 1 else x**e
    special = {-1: aten.reciprocal.default, -0.5: aten.rsqrt.default, 0.5: aten.sqrt.default}
    if e in special:
        return em.call(special[e], x)
    if e == 2:
        return em.call(aten.mul.Tensor, x, x)
    return em.call(aten.pow.Tensor_Scalar, x, e)


_exp_tower = self_tower(lambda y: y)
_log_tower = _reciprocal_tower(0.0, 1.0)
_atan_tower = _inverse_tower(1.0, 1.0, -1.0, 1.0)

defunary(aten.exp.default, _exp_tower)
defunary(aten.exp2.default, exponential_tower(math.log(2.0)))
defunary(aten.expm1.default, self_tower(lambda y: y + 1.0))
defunary(aten.log.default, _log_tower)
defunary(aten.log2.default, _reciprocal_tower(0.0, 1 / math.log(2.0)))
defunary(aten.log10.default, _reciprocal_tower(0.0, 1 / math.log(10.0)))
defunary(aten.log1p.default, _reciprocal_tower(1.0, 1.0))
defunary(aten.sin.default, _pair_tower("sin", "cos", -1.0, 0))
defunary(aten.cos.default, _pair_tower("sin", "cos", -1.0, 1))
defunary(aten.sinh.default, _pair_tower("sinh", "cosh", 1.0, 0))
defunary(aten.cosh.default, _pair_tower("sinh", "cosh", 1.0, 1))
defunary(aten.tan.default, self_tower(lambda y: 1.0 + y**2))
defunary(aten.tanh.default, self_tower(lambda y: 1.0 - y**2))
defunary(aten.sigmoid.default, self_tower(lambda y: y - y**2))
defunary(aten.atan.default, _atan_tower)
defunary(aten.atanh.default, _inverse_tower(1.0, -1.0, -1.0, 1.0))
defunary(aten.asin.default, _inverse_tower(1.0, -1.0, -0.5, 1.0))
defunary(aten.acos.default, _inverse_tower(1.0, -1.0, -0.5, -1.0))
defunary(aten.asinh.default, _inverse_tower(1.0, 1.0, -0.5, 1.0))
defunary(aten.acosh.default, _inverse_tower(-1.0, 1.0, -0.5, 1.0))
defunary(aten.erf.default, _gaussian_tower(2 / math.sqrt(math.pi)))
defunary(aten.erfc.default, _gaussian_tower(-2 / math.sqrt(math.pi)))
defunary(aten.sqrt.default, power_tower(0.5))
defunary(aten.rsqrt.default, power_tower(-0.5))
defunary(aten.reciprocal.default, power_tower(-1.0))


@register(aten.pow.Tensor_Scalar)
def _pow_scalar(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, p = args
    return ctx.unary(x, power_tower(float(p))(ctx, x.primal, out))


@register(aten.pow.Scalar)
def _scalar_pow(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    base, x = args
    # base <= 0: the value is NaN or 0 ** x, outside the supported domain base > 0.
    log_base = math.log(base) if base > 0 else math.nan
    return ctx.unary(x, exponential_tower(log_base)(ctx, x.primal, out))


@register(aten.pow.Tensor_Tensor)
def _pow(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """``x ** p``: a power tower for a constant ``p``, else ``exp(p log x)`` (``x > 0``)."""
    x, p = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    if p.is_constant:
        return ctx.unary(x, power_tower(p.primal)(ctx, x.primal, out))
    em = ctx.em
    log_x = em.call(aten.log.default, x.primal)
    log_jet = Jet(log_x, ctx.unary(x, _log_tower(ctx, x.primal, log_x)))
    exponent = ctx.bilinear(p, log_jet, em.mul, rank=em.rank(out))
    return ctx.unary(Jet(em.mul(p.primal, log_x), exponent), _exp_tower(ctx, None, out))


# -- linear and piecewise-constant ops -----------------------------------------------------
defpointwise_linear(
    aten.neg.default, aten.clone.default, aten.alias.default, aten.mul.Scalar, aten.div.Scalar
)


@register(aten.add.Scalar, aten.sub.Scalar)
def _shift(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return ctx.linear(args[0], lambda t, k: t)


def defslope(op: Any, slope: Callable[..., Operand]) -> None:
    """A piecewise-linear unary op: ``D^k out = slope * D^k x``.

    ``slope(ctx, x, *args, **kwargs)`` gives ``g'`` at the primal ``x`` (the op's other
    arguments follow); every higher derivative of ``g`` is zero.
    """

    def rule(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
        g1 = slope(ctx, args[0].primal, *args[1:], **kwargs)
        return ctx.linear(args[0], lambda t, k: ctx.em.mul(g1, t))

    register(op)(rule)


def _clamp_slope(ctx: DeriveContext, x: fx.Node, low=None, high=None) -> Operand:
    """1 on ``[low, high]`` (torch's clamp passes the gradient at the bounds), else 0."""
    em = ctx.em
    bounds = ((aten.ge.Scalar, low), (aten.le.Scalar, high))
    masks = [em.call(op, x, bound) for op, bound in bounds if bound is not None]
    return masks[0] if len(masks) == 1 else em.call(aten.logical_and.default, *masks)


defslope(aten.abs.default, lambda ctx, x: ctx.em.call(aten.sign.default, x))
defslope(aten.clamp.default, _clamp_slope)

defzero(
    aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default,
    aten.trunc.default, aten.full_like.default, aten.detach.default,
)


# -- binary ops ---------------------------------------------------------------------------
def _weighted(ctx: DeriveContext, out: fx.Node, parts: Sequence[tuple[Operand, Jet]]):
    """Derivatives of ``sum_i w_i * x_i`` for constant weights ``w_i`` (numbers or nodes
    broadcasting to ``out``), with the ``x_i``'s value dims right-aligned to ``out``'s."""
    em, rank = ctx.em, ctx.em.rank(out)
    return [
        em.sum_terms([em.mul(w, ctx.align(x.d(k), k, rank)) for w, x in parts])
        for k in range(1, ctx.order + 1)
    ]


@register(aten.add.Tensor, aten.sub.Tensor)
def _add(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    alpha = kwargs.get("alpha", 1)
    sign = -1 if out.target is aten.sub.Tensor else 1
    return _weighted(ctx, out, [(1, as_jet(ctx, args[0])), (sign * alpha, as_jet(ctx, args[1]))])


@register(aten.mul.Tensor)
def _mul(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    a, b = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    return ctx.bilinear(a, b, ctx.em.mul, rank=ctx.em.rank(out))


def quotient(ctx: DeriveContext, a: Jet, b: Jet, rank: int) -> list[Operand]:
    """Derivatives of ``a / b`` with value dims right-aligned to ``rank``."""
    em = ctx.em
    if b.is_constant:
        return [
            None if a.d(k) is None
            else em.call(aten.div.Tensor, ctx.align(a.d(k), k, rank), b.primal)
            for k in range(1, ctx.order + 1)
        ]
    inverse = _power(ctx, b.primal, -1)
    inverse_jet = Jet(inverse, ctx.unary(b, power_tower(-1.0)(ctx, b.primal, inverse)))
    return ctx.bilinear(a, inverse_jet, em.mul, rank=rank)


@register(aten.div.Tensor, aten.div.Tensor_mode)
def _div(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """True division; floor or trunc division (``rounding_mode``) is piecewise constant."""
    if kwargs.get("rounding_mode") is not None:
        return [None] * ctx.order
    return quotient(ctx, as_jet(ctx, args[0]), as_jet(ctx, args[1]), ctx.em.rank(out))


def select(ctx: DeriveContext, condition: fx.Node, a: Jet, b: Jet, rank: int) -> list[Operand]:
    """Derivatives of ``where(condition, a, b)`` for a constant ``condition``."""
    em = ctx.em
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


@register(aten.where.self)
def _where(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    a, b = as_jet(ctx, args[1]), as_jet(ctx, args[2])
    return select(ctx, args[0].primal, a, b, ctx.em.rank(out))


@register(aten.maximum.default, aten.minimum.default)
def _extremum(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """As torch: the larger (smaller) operand's derivatives, their mean on ties.

    The weight of ``a`` is ``(1 + sign(a - b)) / 2`` for maximum (``1 - ...`` for minimum).
    """
    em = ctx.em
    a, b = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    direction = 0.5 if out.target is aten.maximum.default else -0.5
    sign = em.call(aten.sign.default, em.call(aten.sub.Tensor, a.primal, b.primal))
    step = em.mul(direction, sign)
    return _weighted(ctx, out, [(em.add(step, 0.5), a), (em.sub(0.5, step), b)])


@register(aten.atan2.default)
def _atan2(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """``atan2(a, b) = atan(q) + c`` with ``c`` piecewise constant and ``|q| <= 1``.

    ``q = a / b`` where ``|b| >= |a|``, else ``-b / a``: both ratios stay bounded, so the
    atan tower never meets the large values ``a / b`` takes near ``b = 0``.
    """
    em, rank = ctx.em, ctx.em.rank(out)
    a, b = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    neg_b = Jet(em.neg(b.primal), [em.neg(d) for d in b.derivs])
    keep = em.call(aten.ge.Tensor, em.call(aten.abs.default, b.primal),
                   em.call(aten.abs.default, a.primal))
    numerator = Jet(em.call(aten.where.self, keep, a.primal, neg_b.primal),
                    select(ctx, keep, a, neg_b, rank))
    denominator = Jet(em.call(aten.where.self, keep, b.primal, a.primal),
                      select(ctx, keep, b, a, rank))
    q = em.call(aten.div.Tensor, numerator.primal, denominator.primal)
    q_jet = Jet(q, quotient(ctx, numerator, denominator, rank))
    return ctx.unary(q_jet, _atan_tower(ctx, q, None))


@register(aten.hypot.default)
def _hypot(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """``sqrt(a^2 + b^2)``: Leibniz for the squares, then the square root's tower."""
    em, rank = ctx.em, ctx.em.rank(out)
    a, b = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    squares = [ctx.bilinear(x, x, em.mul, rank=rank) for x in (a, b)]
    total = em.add(em.mul(a.primal, a.primal), em.mul(b.primal, b.primal))
    total_jet = Jet(total, [em.add(da, db) for da, db in zip(*squares, strict=True)])
    return ctx.unary(total_jet, power_tower(0.5)(ctx, total, out))
