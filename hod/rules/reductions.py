"""Reductions: sums and means are linear; their derivatives reduce the same value dims."""

from __future__ import annotations

import math

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext
from ._registry import register
from .shape import from_end

aten = torch.ops.aten


def _reduced_dims(dims, rank: int) -> list[int]:
    """Value dims a reduction covers, counted from the end (``None``/``[]`` means all)."""
    if not dims:
        return list(range(-rank, 0))
    return sorted(from_end(d, rank) for d in dims)


def _linear_reduction(ctx: DeriveContext, args: tuple, kwargs: dict, mean: bool) -> list[Operand]:
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    em = ctx.em
    shape = em.shape(x.primal)
    value_dims = _reduced_dims(dims, len(shape))
    scale = 1.0 / math.prod(shape[d] for d in value_dims) if mean else 1.0

    def apply(t: fx.Node, k: int) -> Operand:
        if not value_dims:
            return t
        return em.mul(scale, em.call(aten.sum.dim_IntList, t, value_dims, keepdim))

    return ctx.linear(x, apply)


@register(aten.sum.dim_IntList)
def _sum(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return _linear_reduction(ctx, args, kwargs, mean=False)


@register(aten.mean.dim, aten.mean.default)
def _mean(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return _linear_reduction(ctx, args, kwargs, mean=True)


def _dims_and_keepdim(args: tuple, kwargs: dict) -> tuple[list[int] | None, bool]:
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return ([dims] if isinstance(dims, int) else dims), keepdim


@register(aten.amax.default, aten.amin.default, aten.max.default, aten.min.default)
def _extremum(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """As torch: the derivatives of the extreme entries, averaged over ties.

    ``D^k out = sum(w * D^k x, dims)`` with ``w = [x == out] / count`` (shape of ``x``).
    """
    x = args[0]
    em = ctx.em
    dims, keepdim = _dims_and_keepdim(args, kwargs)
    value_dims = _reduced_dims(dims, em.rank(x.primal))
    if not value_dims:
        return ctx.linear(x, lambda t, k: t)
    shape = list(em.shape(x.primal))
    for d in value_dims:
        shape[d] = 1
    hits = em.call(aten.eq.Tensor, x.primal, em.reshape(out, shape))
    hits = em.call(aten._to_copy.default, hits, dtype=em.dtype_of(out))
    weights = em.call(aten.div.Tensor, hits, em.call(aten.sum.dim_IntList, hits, value_dims, True))
    return ctx.linear(
        x, lambda t, k: em.call(aten.sum.dim_IntList, em.mul(weights, t), value_dims, keepdim)
    )


@register(aten.cumsum.default)
def _cumsum(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim = args[0], args[1]
    dim = from_end(dim, ctx.em.rank(x.primal))
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.cumsum.default, t, dim, **kwargs))


# The reverse graphs of cumsum and prod (torch's backward formulas) flip along the
# reduced dim. This linear rule belongs with the shape family; it lives here until that
# family has one.
@register(aten.flip.default)
def _flip(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dims = args
    rank = ctx.em.rank(x.primal)
    dims = [from_end(d, rank) for d in dims]
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.flip.default, t, dims))
