"""Matrix products: bilinear, so Leibniz with ``matmul`` broadcasting the seed axes."""

from __future__ import annotations

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext
from ._registry import register
from .elementwise import as_jet

aten = torch.ops.aten


def _matmul(ctx: DeriveContext):
    return lambda a, b: ctx.em.call(aten.matmul.default, a, b)


@register(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return ctx.bilinear(as_jet(ctx, args[0]), as_jet(ctx, args[1]), _matmul(ctx), rank=None)


@register(aten.addmm.default)
def _addmm(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    bias, a, b = (as_jet(ctx, v) for v in args)
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    em, rank = ctx.em, ctx.em.rank(out)
    products = ctx.bilinear(a, b, _matmul(ctx), rank=None)
    return [
        em.add(em.mul(beta, ctx.align(bias.d(k), k, rank)), em.mul(alpha, products[k - 1]))
        for k in range(1, ctx.order + 1)
    ]
