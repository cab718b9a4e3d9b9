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


@register(aten.sum.dim_IntList, aten.sum.default)
def _sum(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return _linear_reduction(ctx, args, kwargs, mean=False)


@register(aten.mean.dim, aten.mean.default)
def _mean(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return _linear_reduction(ctx, args, kwargs, mean=True)
