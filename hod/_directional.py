"""API stage: ``D^k f`` along directions the call passes, the body that chunked and sparse
derivatives run.

``D^k f`` along ``R`` directions ``V`` over the seed space (the entries of the
differentiated leaves, flattened and concatenated in positional order) is the first Taylor
coefficient of ``D^(k-1) f`` along each of them (of ``f`` itself for ``k = 1``): one
forward sweep of width ``R`` through hod's own generated code for ``D^(k-1) f``. Each
distinct ``(R, S)`` shape is generated once; the directions are an input of that code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils._pytree import tree_unflatten

from ._build import Lowered
from ._records import FlatCall, Request, TaylorPlan
from ._taylor_api import TaylorFunction

#: The first coefficients along the directions the call passes.
FIRST_COEFFICIENTS = TaylorPlan(order=1, returns=(1,), series=True)


class Directional:
    """``D^k f`` along directions, for ``request`` (its order, ``has_aux`` and
    ``with_values``); ``inner`` computes ``D^(k-1) f`` as the request would (``f`` for
    ``k = 1``)."""

    def __init__(self, request: Request, argnums: tuple[int, ...], inner: Callable) -> None:
        self.request, self.inner = request, inner
        body = replace(request, f=self.top, order=1, has_aux=False, with_values=False)
        self.function = TaylorFunction(body, argnums, FIRST_COEFFICIENTS)

    def __call__(self, args: tuple, kwargs: dict, directions: torch.Tensor,
                 flat: FlatCall) -> Any:
        """A tree like ``D^(k-1) f``'s blocks, each ``(R,) + block``."""
        (coefficients,) = self.function(*args, series(directions, flat), **kwargs)
        return coefficients

    def lower(self, args: tuple, kwargs: dict, directions: torch.Tensor,
              flat: FlatCall) -> Lowered:
        return self.function.lower(*args, series(directions, flat), **kwargs)

    def top(self, *args: Any, **kwargs: Any) -> Any:
        """``D^(k-1) f`` without ``f``'s aux and the lower orders."""
        result = self.inner(*args, **kwargs)
        if self.request.has_aux:
            result = result[0]
        if self.request.with_values and self.request.order > 1:
            result = result[-1]
        return result


def series(directions: torch.Tensor, flat: FlatCall) -> tuple:
    """``(R, S)`` directions as a Taylor series argument: per differentiated leaf (in
    positional order) a one-tuple of its ``(R,) + leaf shape`` part."""
    parts, offset = [], 0
    for pos in flat.diff:
        leaf = flat.tensors[pos]
        part = directions[:, offset:offset + leaf.numel()]
        parts.append((part.reshape(directions.shape[0], *leaf.shape).to(leaf.dtype),))
        offset += leaf.numel()
    return tuple(parts)


def unit_rows(width: int, size: int, seeds: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``(width, size)``: row ``r`` is one at ``seeds[r]``; rows past ``seeds`` are zero."""
    rows = torch.zeros(width, size, dtype=like.dtype, device=like.device)
    if seeds:
        index = torch.arange(len(seeds), device=like.device)
        rows[index, torch.as_tensor(seeds, device=like.device)] = 1
    return rows


def argnum_order(request: Request) -> tuple[int, ...]:
    """The differentiated arguments in the order results nest them (``argnums``' own)."""
    return request.argnums if isinstance(request.argnums, tuple) else (request.argnums,)


def nest(request: Request, flat: FlatCall, blocks: list) -> Any:
    """One block's derivatives w.r.t. every leaf (``blocks``, in :func:`argnum_order`),
    nested as ``jacfwd(argnums)`` nests them: per argnum (a tuple when argnums is one),
    that argument's pytree."""
    per_arg, start = [], 0
    for a in argnum_order(request):
        layout = flat.layouts[a]
        per_arg.append(tree_unflatten(blocks[start:start + len(layout.leaves)], layout.spec))
        start += len(layout.leaves)
    return tuple(per_arg) if isinstance(request.argnums, tuple) else per_arg[0]
