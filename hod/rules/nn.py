"""Softmax, log-softmax and pooling.

Softmax ``s = exp(y)`` along ``dim``, with ``y = log_softmax(x) = x - L`` and ``L`` the
logsumexp of ``x``, constant along ``dim``. Faà di Bruno for ``exp`` gives
``D^k s = s * (D^k y + B_k)``, ``B_k`` the terms of the lower orders ``D^1 y .. D^(k-1) y``,
and the entries of ``D^k s`` sum to zero along ``dim`` (those of ``s`` sum to one), so with
``u_k = D^k x + B_k``::

    D^k L = sum(s * u_k, dim),   D^k y = D^k x - D^k L,   D^k s = s * u_k - s * D^k L.

Order by order, that is one sum along ``dim`` per order, where logsumexp's own tower
(exp, sum, log) and then exp's took about twice the passes over the derivatives.
"""

from __future__ import annotations

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext
from .._records import Jet
from ._registry import register
from .shape import from_end

aten = torch.ops.aten


def _softmax_jets(
    ctx: DeriveContext, x: Jet, dim: int, s: fx.Node
) -> tuple[list[Operand], list[Operand]]:
    """``(D^k log_softmax(x), D^k softmax(x))`` for ``k = 1..order``, ``s = softmax(x)``."""
    em = ctx.em
    dim = from_end(dim, em.rank(x.primal))
    logs: list[Operand] = []
    softs: list[Operand] = []
    for k in range(1, ctx.order + 1):
        lower = Jet(x.primal, [*logs, x.d(k)] + [None] * (ctx.order - k))
        u = ctx.faa_di_bruno(lower, lambda j: 1, k)
        if u is None:
            logs.append(None)
            softs.append(None)
            continue
        scaled = em.mul(s, u)
        shift = em.sum_dims(scaled, [dim], True)
        logs.append(em.sub(x.d(k), shift))
        softs.append(em.sub(scaled, em.mul(s, shift)))
    return logs, softs


@register(aten._log_softmax.default)
def _log_softmax(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim = args[0], args[1]
    return _softmax_jets(ctx, x, dim, ctx.em.call(aten.exp.default, out))[0]


@register(aten._softmax.default)
def _softmax(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim = args[0], args[1]
    return _softmax_jets(ctx, x, dim, out)[1]


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
