"""Normalising ops, built from the elementwise and reduction rules.

``log_softmax(x) = x - logsumexp(x)`` and ``softmax = exp(log_softmax)``; the shift by
the (constant) maximum inside logsumexp has no derivative and is left out.
"""

from __future__ import annotations

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext, Jet
from ._registry import register
from .elementwise import _exp_tower, _log_tower
from .shape import from_end

aten = torch.ops.aten


def _log_softmax_jet(ctx: DeriveContext, x: Jet, dim: int, out: fx.Node) -> list[Operand]:
    """Derivatives of ``log_softmax(x, dim)`` whose value node is ``out``."""
    em = ctx.em
    rank = em.rank(x.primal)
    dim = from_end(dim, rank)
    shifted = em.call(aten.sub.Tensor, x.primal, em.call(aten.amax.default, x.primal, [dim], True))
    exp = em.call(aten.exp.default, shifted)
    exp_jet = Jet(exp, ctx.unary(Jet(shifted, x.derivs), _exp_tower(ctx, shifted, exp)))
    total = em.call(aten.sum.dim_IntList, exp, [dim], True)
    total_jet = Jet(
        total,
        ctx.linear(exp_jet, lambda t, k: em.sum_dims(t, [dim], True)),
    )
    log_total = ctx.unary(total_jet, _log_tower(ctx, total, None))
    return [em.sub(x.d(k), log_total[k - 1]) for k in range(1, ctx.order + 1)]


@register(aten._log_softmax.default)
def _log_softmax(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim = args[0], args[1]
    return _log_softmax_jet(ctx, x, dim, out)


@register(aten._softmax.default)
def _softmax(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim = args[0], args[1]
    log_softmax = ctx.em.call(aten._log_softmax.default, x.primal, dim, False)
    log_jet = Jet(log_softmax, _log_softmax_jet(ctx, x, dim, log_softmax))
    return ctx.unary(log_jet, _exp_tower(ctx, log_softmax, out))


def _fold_lead(ctx: DeriveContext, t: fx.Node, rank: int) -> fx.Node:
    """``t`` with every dim before its last ``rank`` folded into one leading dim."""
    return ctx.em.reshape(t, [-1, *ctx.em.shape(t)[-rank:]])


@register(aten.avg_pool2d.default)
def _avg_pool2d(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """Linear in the input; pools the last two dims of any leading shape."""
    x, params = args[0], args[1:]
    lead = list(ctx.em.shape(out))

    def apply(t: fx.Node, k: int) -> Operand:
        pooled = ctx.em.call(aten.avg_pool2d.default, _fold_lead(ctx, t, 2), *params, **kwargs)
        return ctx.em.reshape(pooled, [ctx.seed_size] * k + lead)

    return ctx.linear(x, apply)


@register(aten.avg_pool2d_backward.default)
def _avg_pool2d_backward(
    ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node
) -> list[Operand]:
    """Linear in ``grad_output``; the input only gives the shape."""
    grad, x, params = args[0], args[1].primal, args[2:]
    em = ctx.em
    shape = list(em.shape(out))

    def apply(t: fx.Node, k: int) -> Operand:
        like = em.expand(x, [ctx.seed_size] * k + shape)
        pooled = em.call(
            aten.avg_pool2d_backward.default, _fold_lead(ctx, t, 2), _fold_lead(ctx, like, 2),
            *params, **kwargs,
        )
        return em.reshape(pooled, [ctx.seed_size] * k + shape)

    return ctx.linear(grad, apply)
