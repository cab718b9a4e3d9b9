"""API stage: Taylor mode along the call's own series, ``jet`` and ``hvp``.

Each returns a callable whose generated code (one per call signature, like the other hod
transforms) pushes univariate Taylor coefficients through ``f`` (:mod:`hod._taylor`).
Coefficients follow the derivative convention: ``c_k = d^k/dt^k f(x(t))`` at ``t = 0``.
The differential operators built on the same machinery are in :mod:`hod._operators`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ._build import Lowered
from ._compiled import compile_options
from ._function import (
    DEFAULT_MEMORY_LIMIT,
    DerivativeFunction,
    check_memory_limit,
    describe,
    validate_arguments,
)
from ._records import FlatCall, Request, TaylorPlan
from ._series import leaf_series
from ._shard import (
    Placement,
    check_chunk_size,
    check_group,
    chunked,
    rank_rows,
    with_chunk_hint,
)
from ._taylor import build_taylor
from ._vmap import Examples, examples_of
from .errors import InputError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class TaylorFunction(DerivativeFunction):
    """A Taylor-mode plan's generated code, cached per call signature (see
    :class:`~hod.DerivativeFunction`); it is called with ``f``'s arguments, and with the
    input series as one more positional argument when the plan takes them from the call."""

    def __init__(self, request: Request, argnums: tuple[int, ...], plan: TaylorPlan) -> None:
        inner = _without_trailing(request.f, plan.trailing) if plan.trailing else request.f
        # A MemoryLimitError suggests a chunk of the directions (see _build), not of entries.
        super().__init__(replace(request, f=inner), argnums)
        self._plan = plan

    def _build(self, request: Request, flat: FlatCall) -> Lowered:
        return build_taylor(request, flat, self._plan, hint=with_chunk_hint)

    def _examples(self, args: tuple, kwargs: dict) -> Examples | None:
        plan = self._plan
        series = len(args) - plan.trailing if plan.series else None
        return examples_of(args, kwargs, lambda a: a in self._argnums, series)


def taylor_request(call: str, f: Callable, order: int, argnums: Any, memory_limit: Any,
                   compile: Any) -> Request:
    """The build request (:class:`TaylorFunction` hides the plan's own arguments from
    ``f``)."""
    check_memory_limit(call, memory_limit)
    return Request(f=f, order=order, argnums=argnums, has_aux=False, with_values=False,
                   call=call, memory_limit=memory_limit,
                   compile=compile_options(call, compile))


def _without_trailing(f: Callable, count: int) -> Callable:
    """``f`` called with ``count`` more positional arguments, which it does not see."""
    @functools.wraps(f)
    def without(*args: Any, **kwargs: Any) -> Any:
        return f(*args[:-count], **kwargs)

    return without


def differentiated_leaves(call: str, args: tuple, nums: tuple[int, ...]) -> list[torch.Tensor]:
    """The tensor leaves of ``args[a]`` for ``a`` in ``argnums``, in positional order."""
    if any(a >= len(args) for a in nums):
        raise InputError(
            f"{call}: argnums {nums} asks for an argument the call did not pass "
            f"({len(args)} positional argument(s)).\n"
            f"  Fix: pass that argument positionally, or change argnums."
        )
    leaves = [leaf for a in sorted(nums) for leaf in tree_flatten(args[a])[0]]
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or not leaf.dtype.is_floating_point:
            got = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise InputError(
                f"{call}: a differentiated argument holds {got}.\n"
                f"  Expected: real floating-point tensors.\n"
                f"  Fix: convert it, e.g. `x.double()`, or leave it out of argnums."
            )
    return leaves


# -- chunks and ranks -------------------------------------------------------------------------
class Chunks:
    """How a call cuts its ``R`` directions: a rank of ``group`` takes its
    :func:`~hod._shard.rank_rows` of them (all without a group), ``chunk_size`` at a time.

    Every chunk is ``width(R)`` rows wide, the last one padded (with zero directions),
    so that one generated code serves them all; the per-chunk results are summed.
    """

    def __init__(self, call: str, chunk_size: Any, group: Any) -> None:
        check_chunk_size(call, chunk_size)
        check_group(call, group)
        self.size = chunk_size
        self.placement = None if group is None else Placement(group)

    @property
    def active(self) -> bool:
        """Whether the call cuts its directions at all."""
        return self.size is not None or self.placement is not None

    def width(self, total: int) -> int:
        """The rows of one chunk: ``chunk_size``, at most this rank's share of ``total``."""
        world = 1 if self.placement is None else self.placement.world
        share = max(1, -(-total // world))
        return share if self.size is None else min(self.size, share)

    def pieces(self, total: int) -> Iterator[range]:
        """This rank's directions among ``total``, chunk by chunk (one empty chunk when
        it holds none)."""
        rank, world = (0, 1) if self.placement is None else (self.placement.rank,
                                                             self.placement.world)
        return chunked(rank_rows(total, rank, world), self.width(total))

    def rows(self, piece: range, total: int, device: torch.device) -> torch.Tensor:
        """The int64 row indices of a chunk, padded to the chunk's width with ``total``
        (an index past the last direction: a zero one)."""
        rows = torch.full((self.width(total),), total, dtype=torch.int64, device=device)
        rows[: len(piece)] = torch.arange(piece.start, piece.stop, device=device)
        return rows

    def cut(self, tree: Any, piece: range, total: int) -> Any:
        """Rows ``piece`` of every tensor in ``tree`` (directions first), zero-padded to
        the chunk's width."""
        def rows(t: torch.Tensor) -> torch.Tensor:
            part = t[piece.start:piece.stop]
            pad = t.new_zeros(self.width(total) - len(piece), *t.shape[1:])
            return torch.cat([part, pad]) if len(pad) else part

        return tree_map(rows, tree)

    def summed(self, total: int, run_chunk: Callable[[range], Any]) -> Any:
        """The sum over this rank's chunks of ``run_chunk(piece)`` (a tree of tensors)."""
        result = None
        for piece in self.pieces(total):
            part = run_chunk(piece)
            result = part if result is None else tree_map(torch.add, result, part)
        return result

    def partial(self, tree: Any) -> Any:
        """``tree``'s tensors as this rank's parts of sums over the ranks."""
        return tree if self.placement is None else tree_map(self.placement.partial, tree)

    def replicate(self, tree: Any) -> Any:
        """``tree``'s tensors as computed whole on every rank."""
        return tree if self.placement is None else tree_map(self.placement.replicate, tree)


# -- jets and Hessian-vector products ---------------------------------------------------------
class SeriesFunction:
    """What :func:`jet` and :func:`hvp` return: call it as ``(primals, series)``."""

    def __init__(self, call: str, nums: tuple[int, ...], tuple_argnums: bool,
                 inner: TaylorFunction, order: int, what: str, chunks: Chunks) -> None:
        self._call, self._nums, self._tuple = call, nums, tuple_argnums
        self._inner, self._order, self._what = inner, order, what
        self._chunks = chunks

    def _arguments(self, primals: Any, series: Any) -> tuple[tuple, tuple]:
        if not isinstance(primals, (tuple, list)):
            raise InputError(
                f"{self._call}: primals must be a tuple of the function's positional "
                f"arguments, got {type(primals).__name__}.\n  Fix: pass (x,) for one argument."
            )
        primals = tuple(primals)
        differentiated_leaves(self._call, primals, self._nums)
        if self._tuple and not (isinstance(series, (tuple, list))
                                and len(series) == len(self._nums)):
            raise InputError(
                f"{self._call}: argnums is a tuple of {len(self._nums)}, so the {self._what} "
                f"must be a tuple with one entry per differentiated argument.\n"
                f"  Fix: pass a tuple of {len(self._nums)} entries, in argnums order."
            )
        entries = tuple(series) if self._tuple else (series,)
        laid_out = leaf_series(self._call, primals, entries, self._nums, self._order, self._what)
        return primals, laid_out

    def lower(self, primals: Any, series: Any) -> Lowered:
        """The generated artifact for this call's signature (``.code``)."""
        primals, laid_out = self._arguments(primals, series)
        return self._inner.lower(*primals, laid_out)

    def __call__(self, primals: Any, series: Any) -> Any:
        primals, laid_out = self._arguments(primals, series)
        result = self._inner(*primals, laid_out)
        if self._what != "tangents":
            value, *coefficients = result
            result = value, tuple(tree_map(lambda t: t[0], c) for c in coefficients)
        return self._chunks.replicate(result)

    def __repr__(self) -> str:
        return f"<hod {self._call}>"


def jet(
    f: Callable, order: int, argnums: int | tuple[int, ...] = 0, *,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT, compile: bool | dict[str, Any] = False,
    chunk_size: int | None = None, group: ProcessGroup | None = None,
) -> SeriesFunction:
    """Taylor coefficients of ``f`` along a path: ``jf(primals, series)`` returns
    ``(value, (c_1, ..., c_order))``.

    ``primals`` is the tuple of ``f``'s positional arguments; ``series`` holds one entry
    per differentiated argument (a tuple of entries when ``argnums`` is a tuple): a
    direction ``v`` shaped like the argument, for the path ``x + t v``, or a tuple of up
    to ``order`` coefficients ``(s_1, .., s_j)``, for ``x(t) = x + sum_k s_k t^k / k!``.
    For a pytree argument an entry is a pytree like it (a tuple of them for
    coefficients). ``c_k = d^k/dt^k f(x(t))`` at ``t = 0`` (derivatives, not scaled by
    ``1/k!``), each like ``f``'s output; ``value`` is ``f``'s output.

    A jet follows one path, so there is no seed space to cut: ``chunk_size`` is accepted
    and changes nothing, and with ``group=`` every rank computes the whole jet and gets
    ``Replicate`` DTensors.
    """
    call = describe("jet", f, order, argnums)
    nums = validate_arguments(call, f, order, argnums)
    chunks = Chunks(call, chunk_size, group)
    request = taylor_request(call, f, order, argnums, memory_limit, compile)
    plan = TaylorPlan(order=order, returns=tuple(range(order + 1)), series=True)
    inner = TaylorFunction(request, nums, plan)
    return SeriesFunction(call, nums, isinstance(argnums, tuple), inner, order, "series",
                          chunks)


def hvp(
    f: Callable, argnums: int | tuple[int, ...] = 0, *,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT, compile: bool | dict[str, Any] = False,
    chunk_size: int | None = None, group: ProcessGroup | None = None,
) -> SeriesFunction:
    """Hessian-vector products: ``hf(primals, tangents)`` returns ``H v``, shaped like
    the differentiated argument(s); equal to
    ``torch.func.jvp(torch.func.grad(f, argnums), primals, tangents)[1]``.

    ``f`` returns one number (a loss). Computed forward over reverse: one first-order
    jet along ``v`` through ``f``'s traced gradient. ``chunk_size`` and ``group`` act as
    in :func:`jet` (one direction: nothing to cut; ``Replicate`` DTensors).
    """
    call = describe("hvp", f, None, argnums)
    nums = validate_arguments(call, f, 1, argnums)
    chunks = Chunks(call, chunk_size, group)
    request = taylor_request(call, f, 2, argnums, memory_limit, compile)
    plan = TaylorPlan(order=1, returns=(1,), series=True, reverse=True)
    inner = TaylorFunction(request, nums, plan)
    return SeriesFunction(call, nums, isinstance(argnums, tuple), inner, 1, "tangents",
                          chunks)
