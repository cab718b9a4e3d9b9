"""API stage: a derivative computed a chunk of seeds at a time, or a slice of them per rank.

``D^k f`` is the Jacobian of ``D^(k-1) f``: its last index, the one the outermost
``jacfwd`` of the torch.func nesting adds, runs over the seed space, the ``S`` entries of
the differentiated leaves. So one chunk of ``c`` seeds is the derivative along ``c``
unit directions ``V`` (a ``(c, S)`` input) of ``D^(k-1) f``::

    body(t, V, *args) = d/dt  D^(k-1) f(args + t @ V)   at t = 0,   t: (c,)

hod generates ``body`` once per signature, forward mode over ``c`` seeds through its own
code for ``D^(k-1) f`` (``f`` itself for a Jacobian), and runs it once per chunk, the last
chunk padded with zero directions. Every intermediate is sized by ``c``, not ``S``. Each
chunk's columns are the block entries whose last leaf's coordinates it holds; the blocks
are concatenated from them.

With ``group=`` each rank takes its rows of every leaf's first dim (the cut
:class:`~torch.distributed.tensor.Shard` makes, :func:`hod._shard.rank_rows`), chunked
further by ``chunk_size``, and returns each block as a DTensor sharded along that dim;
the values of :func:`hod.derivatives` and the blocks of a 0-dim leaf are replicated.

A Jacobian with few outputs (a single output of ``m`` entries with ``3 m <= S``, as
:func:`hod._plan.choose_mode` sends to reverse mode, ``m`` at most the chunk) is computed
whole: reverse mode's seed space is its ``m`` outputs, within the chunk. Under a group
each rank then keeps its own columns.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._build import Lowered
from ._function import CACHE_SIZE, DerivativeFunction
from ._plan import REVERSE_COST
from ._records import FlatCall, Request
from ._shard import Placement, chunked, rank_rows
from ._signature import flatten_call
from ._tracing import trace_forward


@dataclass(frozen=True)
class Leaf:
    """A differentiated leaf: its place ``offset`` in the seed space, its shape, and the
    rows of its first dim this rank computes (all of them without a group)."""

    offset: int
    shape: tuple[int, ...]
    rows: range

    @property
    def seeds(self) -> range:
        """This rank's seeds of the leaf: the entries of its rows, in order."""
        inner = _numel(self.shape[1:])
        return range(self.offset + self.rows.start * inner, self.offset + self.rows.stop * inner)


@dataclass(frozen=True)
class ChunkPlan:
    """How one signature's derivative is cut: the leaves, this rank's seeds (sorted) and
    the number ``width`` of directions per run of the body."""

    leaves: tuple[Leaf, ...]
    seeds: tuple[int, ...]
    width: int
    size: int  # S
    whole: bool = False  # computed unchunked (see the module's docstring)

    def columns(self, chunk: Sequence[int]) -> list[tuple[int, int]]:
        """Per leaf, the range of ``chunk``'s columns holding its seeds (contiguous,
        since a chunk is sorted and a leaf's seeds are consecutive)."""
        ranges = []
        for leaf in self.leaves:
            seeds = leaf.seeds
            ranges.append((bisect.bisect_left(chunk, seeds.start),
                           bisect.bisect_left(chunk, seeds.stop)))
        return ranges


@dataclass
class ChunkedLowered:
    """What :meth:`ChunkedFunction.lower` returns: ``body`` is the generated code run per
    chunk (``.code``), ``chunks`` how many runs one call makes on this rank, ``width``
    the seeds per run; ``body`` is None when the derivative is computed whole."""

    body: Lowered | None
    whole: Lowered | None
    chunks: int
    width: int

    @property
    def code(self) -> str:
        return (self.body or self.whole).code


class ChunkedFunction:
    """What the derivative transforms return given ``chunk_size=`` or ``group=``: call it
    like ``f``; ``lower`` shows the code run per chunk. Results equal the unchunked
    transform's (DTensors with a group, see :mod:`hod._chunked`)."""

    def __init__(self, request: Request, argnums: tuple[int, ...], inner: Callable,
                 whole: DerivativeFunction, chunk_size: int | None, group: Any) -> None:
        self._request, self._nums = request, argnums
        self._inner, self._whole = inner, whole
        self._chunk_size, self._group = chunk_size, group
        body_request = Request(
            f=self._shifted, order=1, argnums=0, has_aux=True, with_values=False,
            call=request.call, memory_limit=request.memory_limit,
            allow_random=request.allow_random, compile=request.compile,
        )
        self._body = DerivativeFunction(body_request, (0,))
        self._plans: OrderedDict[Hashable, ChunkPlan] = OrderedDict()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = flatten_call(args, kwargs, self._nums, self._request.call)
        plan = self._plan(flat)
        placement = None if self._group is None else Placement(self._group)
        if plan.whole:
            return self._whole_result(plan, flat, args, kwargs, placement)
        pieces: list[list[list[torch.Tensor]]] | None = None
        spec = rest = None
        for chunk in chunked(plan.seeds, plan.width):
            t, directions = self._directions(plan, chunk, flat)
            jacobian, rest = self._body(t, directions, *args, **kwargs)
            blocks, spec = tree_flatten(jacobian)
            pieces = pieces or [[[] for _ in plan.leaves] for _ in blocks]
            for per_block, b in zip(pieces, blocks, strict=True):
                for per_leaf, (lo, hi) in zip(per_block, plan.columns(chunk), strict=True):
                    per_leaf.append(b[..., lo:hi])
        return self._assemble(plan, flat, pieces, spec, rest, placement)

    def lower(self, *args: Any, **kwargs: Any) -> ChunkedLowered:
        """The generated code for this call's signature (see :class:`ChunkedLowered`)."""
        flat = flatten_call(args, kwargs, self._nums, self._request.call)
        plan = self._plan(flat)
        if plan.whole:
            return ChunkedLowered(None, self._whole.lower(*args, **kwargs), 1, 0)
        t, directions = self._directions(plan, plan.seeds[: plan.width], flat)
        body = self._body.lower(t, directions, *args, **kwargs)
        chunks = len(list(chunked(plan.seeds, plan.width)))
        return ChunkedLowered(body, None, chunks, plan.width)

    def clear_cache(self) -> None:
        """Forget all generated code and plans."""
        self._plans.clear()
        self._body.clear_cache()
        self._whole.clear_cache()

    def __repr__(self) -> str:
        return f"<hod {self._request.call}>"

    # -- the plan of a signature ------------------------------------------------------------
    def _plan(self, flat: FlatCall) -> ChunkPlan:
        """The signature's cut."""
        if flat.key in self._plans:
            self._plans.move_to_end(flat.key)
            return self._plans[flat.key]
        placement = None if self._group is None else Placement(self._group)
        leaves, offset = [], 0
        for pos in flat.diff:
            shape = tuple(flat.tensors[pos].shape)
            rows = range(shape[0]) if shape else range(1)
            if placement is not None and shape:
                rows = rank_rows(shape[0], placement.rank, placement.world)
            leaves.append(Leaf(offset, shape, rows))
            offset += _numel(shape)
        seeds = tuple(s for leaf in leaves for s in leaf.seeds)
        width = len(seeds) if self._chunk_size is None else min(self._chunk_size, len(seeds))
        plan = ChunkPlan(tuple(leaves), seeds, max(1, width), offset)
        # One chunk holding every seed is the unchunked code.
        if (placement is None and len(seeds) <= plan.width) or self._few_outputs(plan, flat):
            plan = replace(plan, whole=True)
        self._plans[flat.key] = plan
        while len(self._plans) > CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _few_outputs(self, plan: ChunkPlan, flat: FlatCall) -> bool:
        """A Jacobian that reverse mode computes over outputs fitting in one chunk."""
        if self._request.order != 1:
            return False
        forward = trace_forward(self._whole._request, flat)
        sizes = [n.meta["val"].numel() for n in forward.outputs()[: forward.n_out]]
        return (len(sizes) == 1 and REVERSE_COST * sizes[0] <= plan.size
                and (self._chunk_size is None or sizes[0] <= self._chunk_size))

    def _directions(self, plan: ChunkPlan, chunk: Sequence[int],
                    flat: FlatCall) -> tuple[torch.Tensor, torch.Tensor]:
        """``t = 0`` and the unit directions of ``chunk``'s seeds, ``(width, S)``, the rows
        past the chunk zero."""
        example = flat.tensors[flat.diff[0]]
        t = torch.zeros(plan.width, dtype=example.dtype, device=example.device)
        directions = torch.zeros(plan.width, plan.size, dtype=example.dtype,
                                 device=example.device)
        if chunk:
            rows = torch.arange(len(chunk), device=example.device)
            directions[rows, torch.as_tensor(chunk, device=example.device)] = 1
        return t, directions

    # -- the body: D^(k-1) f along directions -----------------------------------------------
    def _shifted(self, t: torch.Tensor, directions: torch.Tensor, *args: Any,
                 **kwargs: Any) -> tuple[Any, tuple]:
        """``D^(k-1) f`` at ``args + t @ directions`` (its blocks, to differentiate by
        ``t``) and what rides along unchanged: the lower orders and ``f``'s aux."""
        delta = t @ directions
        args = list(args)
        offset = 0
        for a in sorted(self._nums):
            leaves, spec = tree_flatten(args[a])
            moved = []
            for leaf in leaves:
                part = delta[offset:offset + leaf.numel()]
                moved.append(leaf + part.reshape(leaf.shape).to(leaf.dtype))
                offset += leaf.numel()
            args[a] = tree_unflatten(moved, spec)
        result = self._inner(*args, **kwargs)
        aux: Any = ()
        if self._request.has_aux:
            result, aux = result
        values: tuple = ()
        if self._request.with_values:
            values = (result,) if self._request.order == 1 else tuple(result)
            result = values[-1]
        return result, (values, aux)

    # -- the result ---------------------------------------------------------------------------
    def _assemble(self, plan: ChunkPlan, flat: FlatCall, pieces: list, spec: Any, rest: tuple,
                  placement: Placement | None) -> Any:
        """The result from every chunk's columns: per block of ``D^(k-1) f`` and leaf, the
        columns concatenated, shaped ``block + leaf shape`` (this rank's rows of it)."""
        per_block = []
        for columns in pieces:
            blocks = []
            for leaf, parts in zip(plan.leaves, columns, strict=True):
                local = torch.cat(parts, dim=-1)
                outer = tuple(local.shape[:-1])
                local = local.reshape(*outer, len(leaf.rows), *leaf.shape[1:])
                if leaf.shape == ():
                    local = local.reshape(outer)
                blocks.append(local if placement is None
                              else _placed(placement, leaf, local, outer + leaf.shape))
            per_block.append(self._nest(flat, blocks))
        top = tree_unflatten(per_block, spec)
        return self._with_rest(top, rest, placement)

    def _nest(self, flat: FlatCall, blocks: list) -> Any:
        """One block of ``D^(k-1) f`` times every leaf, nested as ``jacfwd(argnums)``
        nests it: per argnum (a tuple when argnums is one), that argument's pytree."""
        per_arg = {a: tree_unflatten([blocks[i] for i in layout.leaves], layout.spec)
                   for a, layout in flat.layouts.items()}
        argnums = self._request.argnums
        return tuple(per_arg[a] for a in argnums) if isinstance(argnums, tuple) else (
            per_arg[argnums])

    def _with_rest(self, top: Any, rest: tuple, placement: Placement | None) -> Any:
        """``top`` with the lower orders before it (``derivatives``) and ``f``'s aux."""
        values, aux = rest
        result = top
        if self._request.with_values:
            if placement is not None:
                values = tree_map(placement.replicate, values)
            result = (*values, top)
        return (result, aux) if self._request.has_aux else result

    def _whole_result(self, plan: ChunkPlan, flat: FlatCall, args: tuple, kwargs: dict,
                      placement: Placement | None) -> Any:
        """The unchunked transform's result; with a group, each rank's rows of it."""
        result = self._whole(*args, **kwargs)
        if placement is None:
            return result
        aux = None
        if self._request.has_aux:
            result, aux = result
        values: tuple = ()
        if self._request.with_values:
            *values, result = result
        argnums = self._request.argnums
        nums = argnums if isinstance(argnums, tuple) else (argnums,)
        leaf_order = itertools.cycle([i for a in nums for i in flat.layouts[a].leaves])

        def place(block: torch.Tensor) -> Any:
            leaf = plan.leaves[next(leaf_order)]
            dim = block.dim() - len(leaf.shape)
            local = block.narrow(dim, leaf.rows.start, len(leaf.rows)) if leaf.shape else block
            return _placed(placement, leaf, local, tuple(block.shape))

        return self._with_rest(tree_map(place, result), (tuple(values), aux), placement)


def _placed(placement: Placement, leaf: Leaf, local: torch.Tensor,
            shape: tuple[int, ...]) -> Any:
    """A block's DTensor: sharded along its last leaf's first dim, replicated for a
    0-dim leaf (every rank computes its one seed)."""
    if not leaf.shape:
        return placement.replicate(local)
    return placement.shard(local, len(shape) - len(leaf.shape), shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
