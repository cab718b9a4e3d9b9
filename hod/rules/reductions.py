"""Reductions and scans over value dims (counted from the end, past the seed axes).

Sums, means and cumulative sums are linear. ``amax``/``max`` are linear too once the
arg-max is fixed: their derivatives read the extreme entries' derivatives. ``prod``,
``cumprod``, ``var``, the norms and ``max.dim`` arrive decomposed (see
``hod/decompositions/elementwise.py``); ``logsumexp`` by torch's own decomposition.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext
from ._registry import register
from .shape import from_end

aten = torch.ops.aten


def _reduced_dims(args: tuple, kwargs: dict, rank: int) -> tuple[list[int], bool]:
    """``(dims, keepdim)`` of a reduction ``op(x, dim=None, keepdim=False)``.

    ``dims`` are counted from the end; ``None`` or an empty list means all of them.
    """
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if isinstance(dims, int):
        dims = [dims]
    if not dims:
        return list(range(-rank, 0)), keepdim
    return sorted(from_end(d, rank) for d in dims), keepdim


def _linear_reduction(ctx: DeriveContext, args: tuple, kwargs: dict, mean: bool) -> list[Operand]:
    x = args[0]
    em = ctx.em
    shape = em.shape(x.primal)
    dims, keepdim = _reduced_dims(args, kwargs, len(shape))
    scale = 1.0 / math.prod(shape[d] for d in dims) if mean else 1.0

    def apply(t: fx.Node, k: int) -> Operand:
        if not dims:
            return t
        return em.mul(scale, em.sum_dims(t, dims, keepdim))

    return ctx.linear(x, apply)


@register(aten.sum.dim_IntList)
def _sum(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return _linear_reduction(ctx, args, kwargs, mean=False)


@register(aten.mean.dim, aten.mean.default)
def _mean(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return _linear_reduction(ctx, args, kwargs, mean=True)


@register(aten.amax.default, aten.amin.default, aten.max.default, aten.min.default)
def _extremum(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """As torch: the derivatives of the extreme entries, averaged over ties.

    ``D^k out = sum(w * D^k x, dims)`` with ``w = [x == out] / count`` (``x``'s shape).
    """
    x = args[0]
    em = ctx.em
    dims, keepdim = _reduced_dims(args, kwargs, em.rank(x.primal))
    if not dims:
        return ctx.linear(x, lambda t, k: t)
    kept_shape = list(em.shape(x.primal))
    for d in dims:
        kept_shape[d] = 1
    hits = em.call(aten.eq.Tensor, x.primal, em.reshape(out, kept_shape))
    hits = em.call(aten._to_copy.default, hits, dtype=em.dtype_of(out))
    weights = em.call(aten.div.Tensor, hits, em.call(aten.sum.dim_IntList, hits, dims, True))
    return ctx.linear(
        x, lambda t, k: em.sum_dims(em.mul(weights, t), dims, keepdim)
    )


@register(aten.cumsum.default)
def _cumsum(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dim = args[0], args[1]
    dim = from_end(dim, ctx.em.rank(x.primal))
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.cumsum.default, t, dim, **kwargs))


# The gradient graphs of cumsum and prod (torch's backward formulas) flip along the
# reduced dim. This linear rule belongs with the shape family; it lives here until that
# family has one.
@register(aten.flip.default)
def _flip(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dims = args
    rank = ctx.em.rank(x.primal)
    dims = [from_end(d, rank) for d in dims]
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.flip.default, t, dims))
