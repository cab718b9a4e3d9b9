"""API stage: a derivative computed a chunk of seeds at a time, or a slice of them per rank.

``D^k f`` is the Jacobian of ``D^(k-1) f``: its last index, the one the outermost
``jacfwd`` of the torch.func nesting adds, runs over the seed space, the ``S`` entries of
the differentiated leaves. So one chunk of ``c`` seeds is ``D^k f`` along ``c`` unit
directions: the first Taylor coefficients of ``D^(k-1) f`` along them
(:mod:`hod._directional`), forward mode over ``c`` seeds through hod's own code for
``D^(k-1) f`` (``f`` itself for a Jacobian). That body is generated once per signature and
run once per chunk, the last chunk padded with zero directions: every intermediate is
sized by ``c``, not ``S``. Each chunk's rows (``(c,) + block``) are written into the
result blocks as they come (:class:`Gathered`): the seed axes moved last, or, for a 0-dim
output at order >= 2, whose derivatives are symmetric, kept first as another block of the
result (no transposing copy).

A Jacobian that reverse mode computes (one output of ``m`` entries, ``3 m <= S``, as
:func:`hod._plan.choose_mode` decides) is cut along its output instead, reverse mode's
seeds: per chunk of entries the Jacobian of ``U @ f`` (``U`` unit rows). A gradient
(``m = 1``), and anything whose seeds fit in one chunk, is computed whole.

With ``group=`` each rank takes its rows of every leaf's first dim (of the output's, for
a reverse Jacobian; the cut :class:`~torch.distributed.tensor.Shard` makes,
:func:`hod._shard.rank_rows`), in chunks of ``chunk_size`` or :data:`GROUP_CHUNK`, and
returns each block as a DTensor sharded along the dim those rows index; the values of
:func:`hod.derivatives`, the blocks of a 0-dim leaf and ``f``'s aux are whole on every
rank. A gradient is computed whole and each rank keeps its rows.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._build import Lowered
from ._directional import Directional, argnum_order, nest, unit_rows
from ._function import CACHE_SIZE, DerivativeFunction
from ._plan import REVERSE_COST
from ._records import FlatCall, Request
from ._shard import Placement, chunked, rank_rows
from ._signature import flatten_call
from ._tracing import trace_forward

#: Seeds per run under ``group=`` without ``chunk_size``: a rank's whole slice in one run
#: was slower than in runs of this many (the chunks sweep's 5,000-parameter Hessian on 2
#: ranks: 1302 ms whole, 850 ms in chunks of 250), and held more memory.
GROUP_CHUNK = 256


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
        inner = math.prod(self.shape[1:])
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
    output: Leaf | None = None  # set: a reverse Jacobian cut along its output's rows
    output_spec: Any = None  # then, the tree spec of f's output

    def columns(self, chunk: Sequence[int]) -> list[tuple[int, int]]:
        """Per leaf, the range of ``chunk``'s columns holding its seeds (contiguous,
        since a chunk is sorted and a leaf's seeds are consecutive)."""
        ranges = []
        for leaf in self.leaves:
            seeds = leaf.seeds
            ranges.append((bisect.bisect_left(chunk, seeds.start),
                           bisect.bisect_left(chunk, seeds.stop)))
        return ranges


class Gathered:
    """The first coefficients of one block of ``D^(k-1) f`` along one leaf's seeds,
    gathered chunk by chunk (``add`` takes ``(seeds,) + block`` rows in seed order) into
    ``leaf rows + block``, or ``block + leaf rows`` when ``last`` (0-dim leaf: ``block``).

    The rows are written into the result as they come, so that no more than the result
    and one chunk are held; under a torch.func transform (whose wrapped tensors cannot be
    written into a plain one) they are kept and concatenated at the end.
    """

    def __init__(self, leaf: Leaf, *, last: bool) -> None:
        self.leaf, self.last = leaf, last
        self.lead = (len(leaf.rows),) + leaf.shape[1:] if leaf.shape else ()
        self.parts: list[torch.Tensor] = []
        self.buffer: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # the buffer as (seeds, block entries)
        self.filled = 0

    def add(self, piece: torch.Tensor) -> None:
        if self.buffer is None and not self.parts and not is_functorch_wrapped_tensor(piece):
            block = tuple(piece.shape[1:])
            seeds, entries = math.prod(self.lead), math.prod(block)
            self.buffer = piece.new_empty(block + self.lead if self.last else self.lead + block)
            self.rows = (self.buffer.view(entries, seeds).T if self.last
                         else self.buffer.view(seeds, entries))
        if self.buffer is None:
            self.parts.append(piece)
            return
        count = piece.shape[0]
        self.rows[self.filled:self.filled + count] = piece.reshape(count, self.rows.shape[1])
        self.filled += count

    def result(self) -> torch.Tensor:
        if self.buffer is not None:
            return self.buffer
        rows = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        rows = rows.reshape(self.lead + tuple(rows.shape[1:]))
        ndim = len(self.lead)
        if not self.last or ndim == 0:
            return rows
        return rows.movedim(tuple(range(ndim)), tuple(range(rows.dim() - ndim, rows.dim())))


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
        self._along = Directional(request, argnums, inner)
        rows_request = replace(request, f=self._projected, order=1, has_aux=False,
                               with_values=False)
        self._rows_body = DerivativeFunction(rows_request, argnums)
        self._plans: OrderedDict[Hashable, ChunkPlan] = OrderedDict()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = flatten_call(args, kwargs, self._nums, self._request.call)
        plan = self._plan(flat)
        placement = None if self._group is None else Placement(self._group)
        if plan.whole:
            return self._whole_result(plan, flat, args, kwargs, placement)
        if plan.output is not None:
            top = self._by_output_rows(plan, flat, args, kwargs, placement)
            return self._with_rest(top, self._rest(args, kwargs), placement)
        order = [i for a in argnum_order(self._request) for i in flat.layouts[a].leaves]
        gathered: list[list[Gathered]] = []
        symmetric, spec = False, None
        for chunk in chunked(plan.seeds, plan.width):
            coefficients = self._along(args, kwargs, self._unit_rows(plan, chunk, flat), flat)
            blocks, spec = tree_flatten(coefficients)
            if not gathered:
                symmetric = self._request.order > 1 and _scalar_outputs(
                    plan, [b.shape for b in blocks], order, self._request.order)
                gathered = [[Gathered(leaf, last=not symmetric) for leaf in plan.leaves]
                            for _ in blocks]
            for per_block, b in zip(gathered, blocks, strict=True):
                for rows, (lo, hi) in zip(per_block, plan.columns(chunk), strict=True):
                    rows.add(b[lo:hi])
        top = self._assemble(plan, flat, gathered, spec, symmetric, placement)
        return self._with_rest(top, self._rest(args, kwargs), placement)

    def lower(self, *args: Any, **kwargs: Any) -> ChunkedLowered:
        """The generated code for this call's signature (see :class:`ChunkedLowered`)."""
        flat = flatten_call(args, kwargs, self._nums, self._request.call)
        plan = self._plan(flat)
        if plan.whole:
            return ChunkedLowered(None, self._whole.lower(*args, **kwargs), 1, 0)
        if plan.output is not None:
            cotangents = self._unit_rows(plan, plan.seeds[: plan.width], flat)
            body = self._rows_body.lower(*args, cotangents, **kwargs)
        else:
            directions = self._unit_rows(plan, plan.seeds[: plan.width], flat)
            body = self._along.lower(args, kwargs, directions, flat)
        chunks = len(list(chunked(plan.seeds, plan.width)))
        return ChunkedLowered(body, None, chunks, plan.width)

    def clear_cache(self) -> None:
        """Forget all generated code and plans."""
        self._plans.clear()
        self._along.function.clear_cache()
        self._rows_body.clear_cache()
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
            offset += math.prod(shape)
        seeds = tuple(s for leaf in leaves for s in leaf.seeds)
        plan = ChunkPlan(tuple(leaves), seeds, self._width(seeds), offset)
        reverse = self._reverse_output(plan, flat)
        if reverse is not None and not reverse[0]:
            # A gradient: reverse mode's one seed. Each rank keeps its rows of it.
            plan = replace(plan, whole=True)
        elif reverse is not None:  # cut the outputs, reverse mode's seeds, instead
            shape, spec = reverse
            rows = range(shape[0])
            if placement is not None:
                rows = rank_rows(shape[0], placement.rank, placement.world)
            output = Leaf(0, shape, rows)
            plan = replace(plan, seeds=tuple(output.seeds), width=self._width(output.seeds),
                           size=math.prod(shape), output=output, output_spec=spec)
        # One chunk holding every seed is the unchunked code.
        if placement is None and len(plan.seeds) <= plan.width:
            plan = replace(plan, whole=True)
        self._plans[flat.key] = plan
        while len(self._plans) > CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _width(self, seeds: Sequence[int]) -> int:
        """Seeds per run of the body: the chunk size, at most all of them; under a group
        without one, at most :data:`GROUP_CHUNK`."""
        chunk = self._chunk_size or (GROUP_CHUNK if self._group is not None else len(seeds))
        return max(1, min(chunk, len(seeds)))

    def _reverse_output(self, plan: ChunkPlan, flat: FlatCall) -> tuple | None:
        """For a Jacobian that reverse mode computes (one output of ``m`` entries,
        ``3 m <= S``, as :func:`hod._plan.choose_mode` decides): the output's shape and
        ``f``'s output spec; None otherwise."""
        if self._request.order != 1:
            return None
        forward = trace_forward(self._whole._request, flat)
        values = [n.meta["val"] for n in forward.outputs()[: forward.n_out]]
        if len(values) != 1 or REVERSE_COST * values[0].numel() > plan.size:
            return None
        return tuple(values[0].shape), forward.out_spec

    @staticmethod
    def _unit_rows(plan: ChunkPlan, chunk: Sequence[int], flat: FlatCall) -> torch.Tensor:
        return unit_rows(plan.width, plan.size, chunk, flat.tensors[flat.diff[0]])

    # -- what rides along ---------------------------------------------------------------------
    def _projected(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``U @ f(args)`` flattened, ``U`` (``(width, m)`` unit rows) the last positional
        argument: reverse mode's seeds for a chunk of the output's entries."""
        output = tree_flatten(self._along.top(*args[:-1], **kwargs))[0][0]
        return args[-1] @ output.reshape(-1)

    def _by_output_rows(self, plan: ChunkPlan, flat: FlatCall, args: tuple, kwargs: dict,
                        placement: Placement | None) -> Any:
        """A reverse Jacobian cut along its output: per chunk of its entries the
        Jacobian of ``U @ f``, whose rows are those of every block."""
        gathered: list[Gathered] = []
        for chunk in chunked(plan.seeds, plan.width):
            rows = self._rows_body(*args, self._unit_rows(plan, chunk, flat), **kwargs)
            blocks = tree_flatten(rows)[0]
            gathered = gathered or [Gathered(plan.output, last=False) for _ in blocks]
            for g, b in zip(gathered, blocks, strict=True):
                g.add(b[:len(chunk)])
        results = [g.result() for g in gathered]
        if placement is not None:
            results = [_placed(placement, plan.output, r, 0) for r in results]
        return tree_unflatten([nest(self._request, flat, results)], plan.output_spec)

    def _rest(self, args: tuple, kwargs: dict) -> tuple[tuple, Any]:
        """The lower orders ``derivatives`` returns before the top one, and ``f``'s aux:
        one call of the order below (of ``f`` for a Jacobian)."""
        request = self._request
        if not (request.with_values or request.has_aux):
            return (), None
        result = self._inner(*args, **kwargs)
        aux = None
        if request.has_aux:
            result, aux = result
        if not request.with_values:
            return (), aux
        return ((result,) if request.order == 1 else tuple(result)), aux

    # -- the result ---------------------------------------------------------------------------
    def _assemble(self, plan: ChunkPlan, flat: FlatCall, gathered: list, spec: Any,
                  symmetric: bool, placement: Placement | None) -> Any:
        """``D^k f`` from every chunk's rows: ``gathered[j][l]`` holds the first
        coefficients of block ``j`` of ``D^(k-1) f`` along the seeds of leaf ``l``.

        Block ``(m_1, .., m_k)`` is block ``(m_1, .., m_(k-1))`` differentiated along leaf
        ``m_k``, the seed axes last. When ``symmetric`` (0-dim outputs, order >= 2) it is
        also block ``(m_2, .., m_k)`` along ``m_1``, the seed axes first, as the chunks
        compute it: no transposing copy.
        """
        order = [i for a in argnum_order(self._request) for i in flat.layouts[a].leaves]
        n, k = len(order), self._request.order
        blocks = []
        for p in range(len(gathered)):
            nested = []
            for m_k in range(n):
                source, leaf = p, order[m_k]
                if symmetric:
                    inner = n ** (k - 2)
                    first, rest = divmod(p % (inner * n), inner)
                    source, leaf = p - p % (inner * n) + rest * n + m_k, order[first]
                block = gathered[source][leaf].result()
                if placement is not None:
                    dim = 0 if symmetric else block.dim() - len(plan.leaves[leaf].shape)
                    block = _placed(placement, plan.leaves[leaf], block, dim)
                nested.append(block)
            blocks.append(nest(self._request, flat, nested))
        return tree_unflatten(blocks, spec)

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
        leaf_order = itertools.cycle(
            [i for a in argnum_order(self._request) for i in flat.layouts[a].leaves]
        )

        def place(block: torch.Tensor) -> Any:
            leaf = plan.leaves[next(leaf_order)]
            dim = block.dim() - len(leaf.shape)
            local = block.narrow(dim, leaf.rows.start, len(leaf.rows)) if leaf.shape else block
            return _placed(placement, leaf, local, dim)

        return self._with_rest(tree_map(place, result), (tuple(values), aux), placement)


def _placed(placement: Placement, leaf: Leaf, local: torch.Tensor, dim: int) -> Any:
    """A block's DTensor: sharded along ``dim``, where this rank's rows of ``leaf``'s first
    dim sit; replicated for a 0-dim leaf (every rank computes its one seed)."""
    if not leaf.shape:
        return placement.replicate(local)
    shape = list(local.shape)
    shape[dim] = leaf.shape[0]
    return placement.shard(local, dim, shape)


def _scalar_outputs(plan: ChunkPlan, shapes: list, order: list[int], k: int) -> bool:
    """Whether every output of ``f`` is 0-dim: the body's block ``p`` is
    ``(width,) + output + leaves m_1 .. m_(k-1)`` (``p``'s digits in base ``n``)."""
    n = len(order)
    for p, shape in enumerate(shapes):
        ranks, q = 0, p % n ** (k - 1)
        for _ in range(k - 1):
            q, digit = divmod(q, n)
            ranks += len(plan.leaves[order[digit]].shape)
        if len(shape) != 1 + ranks:
            return False
    return True

