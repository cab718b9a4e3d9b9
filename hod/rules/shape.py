"""Linear ops that move, copy or select elements: derivatives go through the same op.

With seed axes leading, an op on the value's dims is applied to a derivative tensor by
counting dims from the end (negative dims) or by prefixing the seed axes to a shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext
from .._records import Jet
from ._registry import register
from .elementwise import as_jet

aten = torch.ops.aten


def from_end(dim: int, rank: int) -> int:
    """``dim`` of a rank-``rank`` value counted from the end, valid with leading seed axes."""
    return dim - rank if dim >= 0 else dim


# Only the view ops that survive the core decompositions (reshape, flatten, transpose and
# friends become view/permute).
@register(aten.view.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default)
def _reshape(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    shape = list(ctx.em.shape(out))
    return ctx.linear(args[0], lambda t, k: ctx.em.reshape(t, [ctx.seed_size] * k + shape))


@register(aten.permute.default)
def _permute(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, dims = args
    rank = ctx.em.rank(x.primal)
    return _permuted(ctx, x, [d % rank for d in dims] if rank else [])


@register(aten.transpose.int)
def _transpose(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """Two dims swapped. Core decompositions make transposes permutes; hod meets them as
    the out-of-place form of ``transpose_``, which torch's recurrent layers' decompositions
    call below functionalization."""
    x, a, b = args
    rank = ctx.em.rank(x.primal)
    dims = list(range(rank))
    dims[a % rank], dims[b % rank] = dims[b % rank], dims[a % rank]
    return _permuted(ctx, x, dims)


def _permuted(ctx: DeriveContext, x: Jet, dims: list[int]) -> list[Operand]:
    return ctx.linear(
        x, lambda t, k: ctx.em.permute(t, list(range(k)) + [k + d for d in dims])
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
                d if d is not None else em.zeros(ctx.lead(k) + list(em.shape(p.primal)))
            )
        derivs.append(em.call(aten.cat.default, pieces, dim))
    return derivs



@register(aten.split_with_sizes.default)
def _split(ctx: DeriveContext, args: tuple, kwargs: dict, out: tuple) -> list[list[Operand]]:
    """One derivative list per piece: the same slice of each derivative."""
    x = args[0]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    dim = from_end(dim, ctx.em.rank(x.primal))
    result, start = [], 0
    for piece in out:
        stop = start + ctx.em.shape(piece)[dim]
        result.append(ctx.linear(
            x, lambda t, k, a=start, b=stop: ctx.em.call(aten.slice.Tensor, t, dim, a, b)
        ))
        start = stop
    return result


@register(aten.diagonal.default)
def _diagonal(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x = args[0]
    offset, dim1, dim2 = _diagonal_params(args[1:], kwargs, ctx.em.rank(x.primal))
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.diagonal.default, t, offset, dim1, dim2))


def _diagonal_params(params: tuple, kwargs: dict, rank: int) -> tuple[int, int, int]:
    """``(offset, dim1, dim2)`` of ``diagonal``/``diagonal_scatter``, dims from the end."""
    names = ("offset", "dim1", "dim2")
    offset, dim1, dim2 = (
        params[i] if i < len(params) else kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, (0, 0, 1), strict=True))
    )
    return offset, from_end(dim1, rank), from_end(dim2, rank)


@register(aten.repeat.default)
def _repeat(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    x, repeats = args
    rank = len(repeats)
    return ctx.linear(
        x, lambda t, k: ctx.em.call(aten.repeat.default, ctx.align(t, k, rank), [1] * k + repeats)
    )


@register(aten.constant_pad_nd.default)
def _constant_pad(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    # ``pad`` lists the last dims first, so it applies unchanged under seed axes; the
    # padding value is a constant.
    x, pad = args[0], args[1]
    return ctx.linear(x, lambda t, k: ctx.em.call(aten.constant_pad_nd.default, t, pad, 0.0))


def write_into(
    ctx: DeriveContext, base: Jet, src: Jet, apply: Callable[[fx.Node, fx.Node, int], Operand],
    accumulate: bool = False,
) -> list[Operand]:
    """Derivatives of an op writing ``src`` into (a copy of) ``base``; linear in both.

    ``apply(D^k base, D^k src, k)`` writes one derivative into the other. A zero
    ``D^k src`` leaves ``D^k base`` as it is when the op accumulates, and still
    overwrites the written positions (with zeros) when it does not.
    """
    em = ctx.em
    result: list[Operand] = []
    for k in range(1, ctx.order + 1):
        db, ds = base.d(k), src.d(k)
        if ds is None and (db is None or accumulate):
            result.append(db)
            continue
        lead = ctx.lead(k)
        db = db if db is not None else em.zeros(lead + list(em.shape(base.primal)))
        ds = ds if ds is not None else em.zeros(lead + list(em.shape(src.primal)))
        result.append(apply(db, ds, ctx.axes(k)))
    return result


@register(aten.diagonal_scatter.default)
def _diagonal_scatter(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    base, src = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    params = _diagonal_params(args[2:], kwargs, ctx.em.rank(out))
    return write_into(
        ctx, base, src, lambda b, s, k: ctx.em.call(aten.diagonal_scatter.default, b, s, *params)
    )


@register(aten.slice_scatter.default)
def _slice_scatter(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    base, src, rest = as_jet(ctx, args[0]), as_jet(ctx, args[1]), list(args[2:])
    dim = from_end(rest[0] if rest else kwargs.get("dim", 0), ctx.em.rank(out))
    bounds = rest[1:] or [kwargs.get("start"), kwargs.get("end"), kwargs.get("step", 1)]
    return write_into(
        ctx, base, src,
        lambda b, s, k: ctx.em.call(aten.slice_scatter.default, b, s, dim, *bounds),
    )


@register(aten.copy.default, aten.copy_.default)
def _copy_into(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """``dst.copy_(src)`` overwrites ``dst`` (a fresh intermediate in a traced graph, as in
    torch's decomposition of label smoothing; ``copy`` is its functional form): the
    derivatives are ``src``'s, broadcast to ``dst``'s shape and cast to its dtype."""
    return ctx.linear(as_jet(ctx, args[1]), lambda t, k: t)
