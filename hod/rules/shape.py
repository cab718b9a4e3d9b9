"""Linear ops that move, copy or select elements: derivatives go through the same op.

With seed axes leading, an op on the value's dims is applied to a derivative tensor by
counting dims from the end (negative dims) or by prefixing the seed axes to a shape.
"""

from __future__ import annotations

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext
from ._registry import register

aten = torch.ops.aten


def from_end(dim: int, rank: int) -> int:
    """``dim`` of a rank-``rank`` value counted from the end, valid with leading seed axes."""
    return dim - rank if dim >= 0 else dim


@register(
    aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
    aten.flatten.using_ints,
)
def _reshape(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    shape = list(ctx.em.shape(out))
    return ctx.linear(args[0], lambda t, k: ctx.em.reshape(t, [ctx.seed_size] * k + shape))


@register(aten.permute.default)
def _permute(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dims = args
    rank = ctx.em.rank(x.primal)
    dims = [d % rank for d in dims] if rank else []
    return ctx.linear(
        x, lambda t, k: ctx.em.permute(t, list(range(k)) + [k + d for d in dims])
    )


@register(aten.t.default, aten.transpose.int)
def _transpose(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x = args[0]
    rank = ctx.em.rank(x.primal)
    d0, d1 = (args[1], args[2]) if len(args) == 3 else (0, 1)
    if rank < 2:
        return ctx.linear(x, lambda t, k: t)
    return ctx.linear(
        x, lambda t, k: ctx.em.call(aten.transpose.int, t, from_end(d0, rank), from_end(d1, rank))
    )


@register(aten.expand.default)
def _expand(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x = args[0]
    shape = list(ctx.em.shape(out))
    rank = len(shape)
    return ctx.linear(
        x, lambda t, k: ctx.em.expand(ctx.align(t, k, rank), [ctx.seed_size] * k + shape)
    )


@register(aten.slice.Tensor)
def _slice(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, rest = args[0], list(args[1:])
    rank = ctx.em.rank(x.primal)
    dim = from_end(rest[0] if rest else kwargs.get("dim", 0), rank)
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.slice.Tensor, t, dim, *rest[1:]))


@register(aten.select.int)
def _select(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim, index = args
    dim = from_end(dim, ctx.em.rank(x.primal))
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.select.int, t, dim, index))


@register(aten._to_copy.default)
def _to_copy(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return ctx.linear(args[0], lambda t, k: ctx.em.call(aten._to_copy.default, t, **kwargs))


@register(aten.cat.default)
def _cat(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    parts = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    em = ctx.em
    rank = em.rank(out)
    dim = from_end(dim, rank)
    derivs: list[Operand] = []
    for k in range(1, ctx.order + 1):
        if all(p.d(k) is None for p in parts):
            derivs.append(None)
            continue
        pieces = []
        for p in parts:
            if em.shape(p.primal) == (0,):  # torch.cat skips legacy empty 1-d tensors
                continue
            d = p.d(k)
            pieces.append(
                d if d is not None else em.zeros([ctx.seed_size] * k + list(em.shape(p.primal)))
            )
        derivs.append(em.call(aten.cat.default, pieces, dim))
    return derivs
