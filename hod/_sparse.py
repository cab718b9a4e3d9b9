"""API stage: sparse Jacobians and Hessians, ``sparse=True``.

On the first call of a signature hod traces ``f``, finds the index-level pattern of the
derivative (:mod:`hod._sparsity`: the Jacobian's, or for a Hessian its nonlinear
interactions), colours its columns (:mod:`hod._coloring`: distance-2 for a Jacobian, a
star colouring for a symmetric Hessian) and generates the body along the colours
(:mod:`hod._directional`): one direction per colour, the sum of its columns' unit
vectors, pushed forward through ``f`` for a Jacobian or through hod's gradient code for a
Hessian. That gives the compressed ``B = D S`` (``S`` the ``(seeds, colours)`` colour
indicator), from which each nonzero is read at its recovery position and returned in a
torch sparse tensor per block, shaped like the dense block. Nothing the size of the dense
result is allocated: the directions are ``(colours, seeds)``, ``B`` is
``(colours, entries)``.

``chunk_size`` runs the colours that many at a time; under ``group=`` each rank runs its
slice of the colours and the nonzeros are summed over the ranks (every rank gets the
whole sparse result: DTensor has no sparse layouts).

Under ``torch.func.vmap`` (COO only: functorch batches no CSR tensor) the examples are
differentiated at once (:mod:`hod._vmap`): the Jacobian of the examples' batched function,
or the Hessian of the sum of its per-example values, is block diagonal over the examples
and coloured like one example's; its diagonal blocks, ``(N,) + block``, are each example's.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._build import Lowered
from ._coloring import column_coloring, hessian_recovery, jacobian_recovery, star_coloring
from ._directional import Directional, argnum_order, nest, series
from ._function import CACHE_SIZE, DerivativeFunction
from ._records import FlatCall, Request
from ._shard import Placement, chunked, rank_rows
from ._signature import flatten_call
from ._sparsity import TooDense, constants_fingerprint, hessian_pattern, jacobian_pattern
from ._tracing import trace_forward
from ._vmap import Examples, examples_of
from .errors import InputError, OutputError

LAYOUTS = (torch.sparse_coo, torch.sparse_csr)

#: A dense Jacobian or Hessian is read from a coloured sweep when its generated code would
#: push at least this many times as many seeds as the pattern has colours.
COLOURED_MIN_RATIO = 8
#: ... and the dense result has at least this many entries (below it, the dense code is
#: as fast as the coloured call's fixed costs: Rosenbrock at n = 100, 0.099 ms either way;
#: at n = 200, 0.155 ms dense against 0.102 coloured).
COLOURED_MIN_ENTRIES = 2**14
#: Looking for that pattern stops once a node's pattern (or a Hessian's interactions) holds
#: more than this many nonzeros per seed: such a pattern needs many colours anyway.
COLOURED_PATTERN_PER_SEED = 64


@dataclass(frozen=True)
class Sparsity:
    """A signature's derivative pattern and colouring.

    ``pattern`` is ``(2, nnz)`` int64 (row, column), coalesced, over a ``shape`` of
    ``(entries, seeds)``: rows are the outputs' entries (flattened, concatenated), or the
    seeds again for a Hessian; columns the seeds (the differentiated entries, flattened and
    concatenated in positional order). ``colors`` gives each seed's colour; ``read`` the
    ``(colour, entry)`` position of each nonzero in the compressed ``B^T``.
    """

    pattern: torch.Tensor
    shape: tuple[int, int]
    colors: torch.Tensor
    read: tuple[torch.Tensor, torch.Tensor]

    @functools.cached_property
    def flat_read(self) -> torch.Tensor:
        """The nonzeros' positions in ``B^T`` flattened, ``(colours, entries)``."""
        colour, entry = self.read
        return colour * self.shape[0] + entry

    @property
    def colours(self) -> int:
        return int(self.colors.max()) + 1 if self.colors.numel() else 0

    @property
    def nnz(self) -> int:
        return self.pattern.shape[1]

    def __repr__(self) -> str:
        rows, cols = self.shape
        return (f"Sparsity({self.nnz} nonzeros of {rows} x {cols}, "
                f"{self.colours} colours)")


@dataclass(frozen=True)
class BlockEntries:
    """The nonzeros of one result block: their positions in the pattern (None: all of
    them) and their indices within the block (``(block ndim, n)``), and the block's
    shape."""

    positions: torch.Tensor | None
    indices: torch.Tensor
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SparsePlan:
    sparsity: Sparsity
    colours: tuple[int, ...]  # this rank's colours
    width: int
    blocks: tuple[BlockEntries, ...]  # in the result's flatten order
    spec: Any  # the result's tree spec, without aux
    directions: tuple[torch.Tensor, ...] = ()  # per chunk of colours, (width, S)
    graph: Any = None  # f's traced graph, whose constants' zeros the pattern relies on
    fingerprint: tuple = ()  # their state when the pattern was found


@dataclass
class SparseLowered:
    """What :meth:`SparseFunction.lower` returns: the ``body`` run per chunk of colours
    (``.code``) and the signature's ``sparsity`` (pattern and colouring)."""

    body: Lowered
    sparsity: Sparsity
    chunks: int
    width: int

    @property
    def code(self) -> str:
        return self.body.code


class SparseFunction:
    """What ``jacobian``, ``hessian`` and ``derivative`` (orders 1 and 2) return given
    ``sparse=True``: call it like ``f``; the result has the dense result's structure,
    each block a torch sparse tensor (``to_dense()`` equals the dense block).

    ``per_example``: ``f`` is a function batched over examples (a leading dim of every
    differentiated leaf and output) and each block keeps the examples' diagonal,
    ``(N,) + per-example block``.
    """

    def __init__(self, request: Request, argnums: tuple[int, ...], inner: Callable,
                 layout: torch.layout, chunk_size: int | None, group: Any, *,
                 per_example: bool = False, budget_per_seed: int | None = None) -> None:
        self._request, self._nums, self._layout = request, argnums, layout
        self._chunk_size, self._group = chunk_size, group
        self._per_example, self._budget_per_seed = per_example, budget_per_seed
        self._along = Directional(request, argnums, inner)
        self._plans: OrderedDict[Hashable, SparsePlan] = OrderedDict()
        self._batched: OrderedDict[Hashable, SparseFunction] = OrderedDict()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._per_example:
            examples = examples_of(args, kwargs, lambda a: a in self._nums)
            if examples is not None:
                return self._over_examples(examples)
        flat = self._flatten(args, kwargs)
        plan = self._plan(flat)
        compressed = [self._compressed(args, kwargs, flat, plan, directions)[:len(chunk)]
                      for chunk, directions in zip(chunked(plan.colours, plan.width),
                                                   plan.directions, strict=True)]
        b = torch.cat(compressed) if len(compressed) > 1 else compressed[0]
        if self._group is None:  # one flat index_select: 2.3x faster than take (70k of 70k)
            values = b.reshape(-1).index_select(0, plan.sparsity.flat_read.to(b.device))
        else:
            values = self._summed(b, plan)
        blocks = [self._block(values, entries) for entries in plan.blocks]
        result = tree_unflatten(blocks, plan.spec)
        if self._request.has_aux:
            return result, self._along.inner(*args, **kwargs)[1]
        return result

    def lower(self, *args: Any, **kwargs: Any) -> SparseLowered:
        """The body and the sparsity of this call's signature (see :class:`SparseLowered`)."""
        flat = self._flatten(args, kwargs)
        plan = self._plan(flat)
        body = self._along.lower(args, kwargs, plan.directions[0], flat)
        chunks = len(list(chunked(plan.colours, plan.width)))
        return SparseLowered(body, plan.sparsity, chunks, plan.width)

    def clear_cache(self) -> None:
        """Forget all generated code and patterns."""
        self._plans.clear()
        self._batched.clear()
        self._along.function.clear_cache()

    def __repr__(self) -> str:
        return f"<hod {self._request.call}>"

    def _flatten(self, args: tuple, kwargs: dict) -> FlatCall:
        flat = flatten_call(args, kwargs, self._nums, self._request.call)
        if any(torch._C._functorch.is_batchedtensor(t) for t in flat.tensors):
            raise InputError(
                f"{self._request.call}: sparse=True runs under torch.func.vmap only with "
                f"vmap directly around it, but a vmap-batched argument came under another "
                f"transform (or a vmap drawing random numbers differently).\n"
                f"  Fix: apply the vmap directly to the sparse transform, or differentiate "
                f"the vmapped function, e.g. hod.jacobian(torch.func.vmap(g), sparse=True)."
            )
        return flat

    def _over_examples(self, examples: Examples) -> Any:
        """Every example's sparse blocks, batched at the vmap levels the call came from:
        the diagonal blocks of the derivative of the examples' batched function."""
        if self._layout is not torch.sparse_coo:
            raise InputError(
                f"{self._request.call}: layout=torch.sparse_csr cannot come out of "
                f"torch.func.vmap (functorch batches no CSR tensor).\n"
                f"  Fix: keep the default layout=torch.sparse_coo under vmap and convert the "
                f"batched result with .to_sparse_csr()."
            )
        batched = self._batched.get(examples.key)
        if batched is None:
            request = self._request
            f = examples.vmapped(request.f)
            if request.order == 2:
                f = _summed_over_examples(f, request)
            request = replace(request, f=f)
            inner = f if request.order == 1 else DerivativeFunction(
                replace(request, order=1), self._nums)
            batched = SparseFunction(request, self._nums, inner, self._layout,
                                     self._chunk_size, self._group, per_example=True)
            self._batched[examples.key] = batched
            while len(self._batched) > CACHE_SIZE:
                self._batched.popitem(last=False)
        self._batched.move_to_end(examples.key)
        with examples.below():
            result = batched(*examples.args, **examples.kwargs)
        return examples.wrap(result)

    # -- the compressed derivative -------------------------------------------------------------
    def _directions(self, plan: SparsePlan, colours: Any, flat: FlatCall) -> torch.Tensor:
        """``(width, S)``: row ``r`` is the indicator of the seeds of colour ``colours[r]``
        (rows past ``colours`` zero)."""
        like = flat.tensors[flat.diff[0]]
        directions = torch.zeros(plan.width, plan.sparsity.shape[1], dtype=like.dtype,
                                 device=like.device)
        if colours:
            wanted = torch.as_tensor(colours, device=like.device)
            seeds = plan.sparsity.colors.to(like.device)
            rows = (seeds.unsqueeze(0) == wanted.unsqueeze(1)).nonzero()
            directions[rows[:, 0], rows[:, 1]] = 1
        return directions

    def _compressed(self, args: tuple, kwargs: dict, flat: FlatCall, plan: SparsePlan,
                    directions: torch.Tensor) -> torch.Tensor:
        """``B^T`` along ``directions`` (a chunk of colours): ``(width, entries)``, the
        columns in the pattern's row order (the outputs' entries, or the seeds for a
        Hessian)."""
        coefficients = tree_flatten(self._along(args, kwargs, directions, flat))[0]
        return self._stacked(coefficients, flat, plan)

    def _stacked(self, coefficients: list[torch.Tensor], flat: FlatCall,
                 plan: SparsePlan) -> torch.Tensor:
        """The flat coefficients of the body as ``B^T`` (see :meth:`_compressed`)."""
        if self._request.order == 2:  # the gradient's blocks, in argnums order: to seeds
            order = [i for a in argnum_order(self._request) for i in flat.layouts[a].leaves]
            coefficients = [coefficients[order.index(i)] for i in range(len(order))]
        if len(coefficients) == 1:
            return coefficients[0].reshape(plan.width, -1)
        return torch.cat([c.reshape(plan.width, -1) for c in coefficients], dim=1)

    def _summed(self, b: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
        """The nonzeros from every rank's colours: each reads those of its own colours."""
        import torch.distributed as dist

        colour, entry = plan.sparsity.read
        position = torch.full((plan.sparsity.colours,), -1, dtype=torch.int64)
        position[torch.as_tensor(plan.colours, dtype=torch.int64)] = torch.arange(
            len(plan.colours))
        local = position[colour].to(b.device)
        mine = local >= 0
        values = torch.zeros(plan.sparsity.nnz, dtype=b.dtype, device=b.device)
        values[mine] = b[local[mine], entry[mine].to(b.device)]
        dist.all_reduce(values, group=self._group)
        return values

    def _block(self, values: torch.Tensor, entries: BlockEntries) -> torch.Tensor:
        if self._layout is torch.sparse_csr and len(entries.shape) != 2:
            raise InputError(
                f"{self._request.call}: layout=torch.sparse_csr needs 2-D blocks, but a block "
                f"has shape {entries.shape}.\n"
                f"  Fix: use the default layout=torch.sparse_coo, or flatten the output and "
                f"the arguments to 1-D."
            )
        if entries.positions is not None:
            values = values[entries.positions.to(values.device)]
        block = torch.sparse_coo_tensor(
            entries.indices.to(values.device), values,
            entries.shape, is_coalesced=True, check_invariants=False,
        )
        if self._layout is torch.sparse_coo:
            return block
        with warnings.catch_warnings():  # asked for: torch's "CSR support is in beta" is noise
            warnings.simplefilter("ignore", UserWarning)
            return block.to_sparse_csr()

    # -- the plan of a signature ------------------------------------------------------------
    def _plan(self, flat: FlatCall) -> SparsePlan:
        """The signature's pattern, colouring and blocks; found again when a tensor ``f``
        captures was changed in place since (its zeros may have moved)."""
        plan = self._plans.get(flat.key)
        if plan is not None and constants_fingerprint(plan.graph) == plan.fingerprint:
            self._plans.move_to_end(flat.key)
            return plan
        traced = trace_forward(self._request, flat)
        sizes = [flat.tensors[pos].numel() for pos in flat.diff]
        outputs = [n.meta["val"] for n in traced.outputs()[: traced.n_out]]
        sparsity = self._sparsity(traced, flat, sum(sizes), outputs)
        colours = tuple(range(sparsity.colours))
        if self._group is not None:
            placement = Placement(self._group)
            colours = tuple(rank_rows(len(colours), placement.rank, placement.world))
        width = max(1, len(colours) if self._chunk_size is None
                    else min(self._chunk_size, len(colours)))
        blocks, spec = self._blocks(flat, traced, sparsity, outputs)
        plan = SparsePlan(sparsity, colours, width, blocks, spec)
        plan = replace(plan, directions=tuple(self._directions(plan, chunk, flat)
                                              for chunk in chunked(colours, width)),
                       graph=traced.gm, fingerprint=constants_fingerprint(traced.gm))
        self._plans[flat.key] = plan
        while len(self._plans) > CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _sparsity(self, traced: Any, flat: FlatCall, seeds: int,
                  outputs: list[torch.Tensor]) -> Sparsity:
        budget = None if self._budget_per_seed is None else self._budget_per_seed * seeds
        if self._request.order == 1:
            pattern = jacobian_pattern(traced.gm, flat.diff, traced.n_out, budget)
            shape = (sum(v.numel() for v in outputs), seeds)
            colors = column_coloring(pattern, shape)
            read = (jacobian_recovery(pattern, colors), pattern[0])
            return Sparsity(pattern, shape, colors, read)
        if len(outputs) != 1 or outputs[0].numel() != 1:
            shapes = [tuple(v.shape) for v in outputs]
            raise OutputError(
                f"{self._request.call}: sparse=True Hessians need f to return one number, "
                f"got outputs of shapes {shapes}.\n"
                f"  Fix: reduce the output (a loss), or take sparse Jacobians of its gradient."
            )
        pattern = hessian_pattern(traced.gm, flat.diff, traced.n_out, budget)
        colors = star_coloring(pattern, seeds)
        rows, colours = hessian_recovery(pattern, colors)  # H[i, j] = (H S)[rows, colours]
        return Sparsity(pattern, (seeds, seeds), colors, (colours, rows))

    def _blocks(self, flat: FlatCall, traced: Any, sparsity: Sparsity,
                outputs: list[torch.Tensor]) -> tuple[tuple[BlockEntries, ...], Any]:
        """Each result block's nonzeros, in the result's flatten order, and its spec."""
        leaves = [tuple(flat.tensors[pos].shape) for pos in flat.diff]
        starts = _starts([math.prod(s) for s in leaves])
        if self._request.order == 1:
            row_shapes, out_spec = [tuple(v.shape) for v in outputs], traced.out_spec
        else:
            row_shapes, out_spec = leaves, None
        row_starts = _starts([math.prod(s) for s in row_shapes])
        order = [i for a in argnum_order(self._request) for i in flat.layouts[a].leaves]
        row_order = order if out_spec is None else list(range(len(row_shapes)))
        rows, cols = sparsity.pattern
        blocks, trees = [], []
        for r in row_order:
            in_rows = (rows >= row_starts[r]) & (rows < row_starts[r] + math.prod(row_shapes[r]))
            per_leaf = []
            for leaf in order:
                end = starts[leaf] + math.prod(leaves[leaf])
                positions = (in_rows & (cols >= starts[leaf]) & (cols < end)).nonzero().flatten()
                row = _unravel(rows[positions] - row_starts[r], row_shapes[r])
                column = _unravel(cols[positions] - starts[leaf], leaves[leaf])
                shape = row_shapes[r] + leaves[leaf]
                if self._per_example:  # each example's own block: one example index
                    diagonal = row[0] == column[0]
                    positions, row = positions[diagonal], row[:, diagonal]
                    column = column[1:, diagonal]
                    shape = row_shapes[r] + leaves[leaf][1:]
                if positions.numel() == sparsity.nnz:
                    positions = None  # the one block: every nonzero, in order
                per_leaf.append(BlockEntries(positions, torch.cat([row, column]), shape))
                blocks.append(per_leaf[-1])
            trees.append(nest(self._request, flat, [None] * len(per_leaf)))
        tree = (tree_unflatten(trees, out_spec) if out_spec is not None
                else nest(self._request, flat, trees))
        return tuple(blocks), tree_flatten(tree, is_leaf=lambda x: x is None)[1]


class ColouredDense:
    """Dense Jacobians and Hessians read from a coloured sweep.

    A derivative whose pattern needs few colours (a chained function's banded Hessian: 3
    colours for any ``n``) costs its dense code one tangent per seed through every op; the
    sparse code pushes one per colour, and the dense result is its nonzeros scattered into
    zeros. :meth:`runner` decides per signature, once, by the pattern found with a budget.
    """

    def __init__(self, request: Request, argnums: tuple[int, ...], inner: Callable) -> None:
        self._request = request
        self._sparse = SparseFunction(request, argnums, inner, torch.sparse_coo, None, None,
                                      budget_per_seed=COLOURED_PATTERN_PER_SEED)

    def runner(self, flat: FlatCall, seeds: int) -> Callable | None:
        """What computes the dense result of calls like ``flat`` (flattened as the dense
        transform does) from colours, or None when the dense code, pushing ``seeds``
        tangents, is not ``COLOURED_MIN_RATIO`` times as wide as the colours, the result is
        small, or the pattern is not found within its budget."""
        if any(t.device.type == "meta" or is_functorch_wrapped_tensor(t) for t in flat.tensors):
            return None  # no values to read constants' zeros from; a transform's own code
        try:
            plan = self._sparse._plan(flat)
        except (TooDense, OutputError):
            return None
        rows, columns = plan.sparsity.shape
        if plan.sparsity.colours * COLOURED_MIN_RATIO > seeds or rows * columns < \
                COLOURED_MIN_ENTRIES:
            return None
        return _ColouredRun(self._sparse, flat)


class _ColouredRun:
    """One signature's dense results from its colours, called with the call's arguments
    and its flat tensors (``call_signature``'s): the coloured body runs on them and on the
    plan's directions, and each block's nonzeros are copied from the body's coefficients
    into zeros, with index lists made once per plan."""

    def __init__(self, sparse: SparseFunction, flat: FlatCall) -> None:
        self._sparse, self._flat = sparse, flat
        self._plan: SparsePlan | None = None
        self._body: Lowered | None = None
        self._arg_leaves = 0
        self._directions: list[torch.Tensor] = []
        self._writes: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = []

    def __call__(self, args: tuple, kwargs: dict, tensors: tuple[torch.Tensor, ...]) -> Any:
        sparse = self._sparse
        flat = replace(self._flat, tensors=tensors)
        plan = sparse._plan(flat)
        if plan is not self._plan:
            self._prepare(plan, args, kwargs, flat)
        a = self._arg_leaves
        coefficients = self._body.run([*tensors[:a], *self._directions, *tensors[a:]])
        b = sparse._stacked(coefficients, flat, plan).reshape(-1)
        blocks = []
        for read, write, shape in self._writes:
            block = b.new_zeros(shape)
            block.view(-1).index_copy_(0, write, b.index_select(0, read))
            blocks.append(block)
        result = tree_unflatten(blocks, plan.spec)
        if sparse._request.has_aux:
            return result, sparse._along.inner(*args, **kwargs)[1]
        return result

    def _prepare(self, plan: SparsePlan, args: tuple, kwargs: dict, flat: FlatCall) -> None:
        """The body and the index lists of ``plan`` (one chunk: no ``chunk_size``)."""
        (directions,) = plan.directions
        self._body = self._sparse._along.lower(args, kwargs, directions, flat)
        self._arg_leaves = sum(isinstance(leaf, torch.Tensor) for leaf in tree_flatten(args)[0])
        self._directions = [d.contiguous() for d in tree_flatten(series(directions, flat))[0]]
        device = flat.tensors[flat.diff[0]].device
        read_all = plan.sparsity.flat_read.to(device)
        self._writes = []
        for entries in plan.blocks:
            read = read_all if entries.positions is None else \
                read_all[entries.positions.to(device)]
            strides = torch.tensor([math.prod(entries.shape[d + 1:])
                                    for d in range(len(entries.shape))], dtype=torch.int64)
            write = (entries.indices * strides.unsqueeze(1)).sum(0).to(device)
            self._writes.append((read, write, entries.shape))
        self._plan = plan


def _summed_over_examples(batched: Callable, request: Request) -> Callable:
    """The sum of the examples' values of ``batched`` (outputs ``(N,) + ...``), whose
    Hessian is block diagonal with each example's Hessian on the diagonal."""

    def summed(*args: Any, **kwargs: Any) -> Any:
        result = batched(*args, **kwargs)
        value = result[0] if request.has_aux else result
        if not isinstance(value, torch.Tensor) or value.numel() != value.shape[0]:
            shape = tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else type(value)
            raise OutputError(
                f"{request.call}: sparse=True Hessians need f to return one number, got "
                f"{shape} per example under torch.func.vmap.\n"
                f"  Fix: reduce each example's output (a loss), or take sparse Jacobians of "
                f"its gradient."
            )
        return (value.sum(), result[1]) if request.has_aux else value.sum()

    return summed


def _starts(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts


def _unravel(flat_index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``(len(shape), n)`` indices of flat positions in ``shape`` (row-major)."""
    if not shape:
        return flat_index.new_zeros((0, flat_index.numel()))
    return torch.stack(torch.unravel_index(flat_index, shape))

