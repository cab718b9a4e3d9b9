"""Ops that read or write elements at integer indices: linear in their float operands.

Index tensors carry no seed axes, so each rule gives them some: ``gather``/``scatter``
indices are expanded over the leading seed axes; advanced indexing (``index``,
``index_put``) indexes the *leading* dims, so there the seed axes are moved to the end
for the call and back to the front after it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext
from ._registry import register
from .elementwise import as_jet
from .shape import from_end, write_into

aten = torch.ops.aten


def _lead_index(ctx: DeriveContext, index: fx.Node, k: int) -> fx.Node:
    """``index`` expanded to ``(S,) * k + index.shape`` (a view, no copy)."""
    shape = list(ctx.em.shape(index))
    return ctx.em.expand(ctx.em.reshape(index, [1] * k + shape), [ctx.seed_size] * k + shape)


def _seeds_last(ctx: DeriveContext, t: fx.Node, k: int) -> fx.Node:
    rank = ctx.em.rank(t)
    return ctx.em.permute(t, [*range(k, rank), *range(k)])


def _seeds_first(ctx: DeriveContext, t: fx.Node, k: int) -> fx.Node:
    rank = ctx.em.rank(t)
    return ctx.em.permute(t, [*range(rank - k, rank), *range(rank - k)])


@register(aten.index_select.default)
def _index_select(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim, index = args[0], args[1], args[2].primal
    dim = from_end(dim, ctx.em.rank(x.primal))
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.index_select.default, t, dim, index))


@register(aten.gather.default)
def _gather(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim, index = args[0], args[1], args[2].primal
    dim = from_end(dim, ctx.em.rank(x.primal))
    return ctx.linear(
        x, lambda t, k: ctx.em.call(aten.gather.default, t, dim, _lead_index(ctx, index, k))
    )


def _def_scatter(op: Any, accumulate: bool) -> None:
    """``scatter``-like ops writing ``src`` into ``self`` at ``index`` along ``dim``."""

    def rule(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
        base, dim, index = as_jet(ctx, args[0]), args[1], args[2].primal
        src = as_jet(ctx, args[3])
        dim = from_end(dim, ctx.em.rank(out))
        return write_into(
            ctx, base, src,
            lambda b, s, k: ctx.em.call(op, b, dim, _lead_index(ctx, index, k), s),
            accumulate=accumulate,
        )

    register(op)(rule)


_def_scatter(aten.scatter_add.default, accumulate=True)
_def_scatter(aten.scatter.src, accumulate=False)


def _indices(args: tuple) -> list:
    """The index list with its tensors as nodes (``None`` keeps a dim whole)."""
    return [None if i is None else i.primal for i in args[1]]


@register(aten.index.Tensor)
def _index(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    indices = _indices(args)

    def apply(t: fx.Node, k: int) -> Operand:
        picked = ctx.em.call(aten.index.Tensor, _seeds_last(ctx, t, k), indices)
        return _seeds_first(ctx, picked, k)

    return ctx.linear(args[0], apply)


@register(aten.index_put.default)
def _index_put(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    base, values = as_jet(ctx, args[0]), as_jet(ctx, args[2])
    indices = _indices(args)
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    em = ctx.em
    # The written region's rank: values broadcast against it by right alignment.
    region = aten.index.Tensor(base.primal.meta["val"], [
        None if i is None else i.meta["val"] for i in indices
    ]).dim()

    def apply(b: fx.Node, s: fx.Node, k: int) -> Operand:
        s = ctx.align(s, k, region)
        if accumulate and len(indices) == 1 and indices[0] is not None:
            return _added_rows(ctx, b, indices[0], s, k)
        written = em.call(aten.index_put.default, _seeds_last(ctx, b, k), indices,
                          _seeds_last(ctx, s, k), accumulate)
        return _seeds_first(ctx, written, k)

    return write_into(ctx, base, values, apply, accumulate=accumulate)


def _added_rows(ctx: DeriveContext, b: fx.Node, index: fx.Node, s: fx.Node, k: int) -> fx.Node:
    """``b[:, .., index] += s`` (``k`` seed axes first) as one ``index_add`` along the first
    value dim: the gradient of ``x[index]`` without moving the seed axes last and back
    (an ``index_put`` on permuted operands took 3x as long)."""
    em = ctx.em
    lead, rows = list(em.shape(b))[:k], list(em.shape(b))[k + 1:]
    region = lead + list(em.shape(index)) + rows
    flat = em.reshape(em.expand(s, region), lead + [-1] + rows)
    return em.call(aten.index_add.default, b, k, em.reshape(index, [-1]), flat)


@register(aten.scatter.value)
def _scatter_value(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """Writes a constant: the written positions' derivatives become zero."""
    x, dim, index = args[0], args[1], args[2].primal
    dim = from_end(dim, ctx.em.rank(out))
    return ctx.linear(
        x, lambda t, k: ctx.em.call(aten.scatter.value, t, dim, _lead_index(ctx, index, k), 0.0)
    )
