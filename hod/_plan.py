"""Plan stage: forward or reverse-last, and which inputs to seed compressed by batch.

The mode: forward costs about ``S^n`` sweeps through the graph at seed width 1;
reverse-last about ``REVERSE_COST * m * S^(n-1)`` for an output of ``m`` elements.
Compressing a batch dim divides a leaf's share of ``S`` by the batch size. The candidate
seed plans are the plain seeds and the compressions that keep every block the plan must
read valid (see :mod:`hod._analysis`); the planner keeps the one of least ``cost``: the
smallest ``S`` by default, and for reverse-last the work :mod:`hod._cost` estimates, which
also sees how far back each gradient needs each seed.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import fx

from ._analysis import track_batch
from ._cost import derivative_work
from ._per_example import with_per_example_terms
from ._records import MIXED, BuildState, Mode, SeedPlan, Segment, Span, Traced
from ._row_blocks import with_row_blocks
from ._tracing import trace_reverse

#: One reverse sweep costs about this many forward sweeps.
REVERSE_COST = 3


def plain_segments(
    shapes: Sequence[tuple[int, ...]], batch_dim: int | None = None
) -> list[Segment]:
    """Segments one after another, uncompressed, or all compressed along ``batch_dim``."""
    segments, offset = [], 0
    for shape in shapes:
        segments.append(Segment(offset, tuple(shape), batch_dim))
        offset += segments[-1].size
    return segments


def row_seeds(shapes: Sequence[tuple[int, ...]], out_states: Sequence[int]) -> SeedPlan:
    """The seeds of one example for a call holding independent examples along dim 0 of
    every leaf (:attr:`~hod._records.FlatCall.rows`): independence is known, so no
    analysis runs; ``out_states`` gives where each output of the graph holds them."""
    return SeedPlan(tuple(plain_segments(shapes, 0)), tuple(out_states), rows=True)


#: ``required(batch)``: the outputs that compressed seeds of the leaves in ``batch`` are
#: read from; each must stay tracked (or free) for the compression to be valid.
Required = Callable[[dict[int, int]], Sequence[int]]


def plan_seeds(
    gm: fx.GraphModule,
    diff_positions: Sequence[int],
    shapes: Sequence[tuple[int, ...]],
    required: Required,
    cost: Callable[[SeedPlan], float] = lambda plan: plan.size,
) -> SeedPlan:
    """The valid seed space of least ``cost`` (by default the smallest one) for
    derivatives of ``gm``'s outputs.

    ``diff_positions[l]`` is leaf ``l``'s placeholder index and ``shapes[l]`` its shape.
    In forward mode every differentiated output is read with every seed; in reverse-last
    mode a compressed leaf's blocks are read from its own gradient output. The candidates
    are the plain seeds and, for each leaf's dim, the largest compression grown from it.
    """
    candidates = [SeedPlan(tuple(plain_segments(shapes)), tuple(track_batch(gm, {})))]
    for first, shape in enumerate(shapes):
        for dim, size in enumerate(shape):
            if size < 2:
                continue
            batch = _grow(gm, diff_positions, shapes, required, {first: dim}, size)
            if batch is not None:
                candidates.append(_seed_plan(gm, diff_positions, shapes, batch))
    return min(candidates, key=cost)  # the first of the cheapest: plain seeds on a tie


def _grow(gm, diff_positions, shapes, required: Required, batch: dict[int, int], size: int):
    """Start from one compressed leaf and add every other leaf that keeps it valid."""
    if not valid_batch(gm, diff_positions, required, batch):
        return None
    for leaf, shape in enumerate(shapes):
        if leaf in batch:
            continue
        for dim, n in enumerate(shape):
            if n == size and valid_batch(gm, diff_positions, required, {**batch, leaf: dim}):
                batch = {**batch, leaf: dim}
                break
    return batch


def valid_batch(gm, diff_positions, required: Required, batch: dict[int, int]) -> bool:
    """Whether the leaves of ``batch`` (leaf -> dim) can be compressed together: slice
    ``b`` of each along its dim reaches only slice ``b`` of the required outputs."""
    states = track_batch(gm, {diff_positions[leaf]: dim for leaf, dim in batch.items()})
    return all(states[i] != MIXED for i in required(batch))


def _seed_plan(gm, diff_positions, shapes, batch: dict[int, int]) -> SeedPlan:
    segments, offset = [], 0
    for leaf, shape in enumerate(shapes):
        segment = Segment(offset, tuple(shape), batch.get(leaf))
        segments.append(segment)
        offset += segment.size
    states = track_batch(gm, {diff_positions[leaf]: dim for leaf, dim in batch.items()})
    return SeedPlan(tuple(segments), tuple(states))


def choose_mode(order: int, out_sizes: Sequence[int], seed_size: int) -> Mode:
    """Reverse-last for one output small against the seed space, else forward."""
    if len(out_sizes) == 1 and REVERSE_COST * out_sizes[0] <= seed_size:
        return Mode.REVERSE_LAST
    return Mode.FORWARD


def plan_reverse(state: BuildState, shapes: list[tuple[int, ...]]) -> tuple[Traced, SeedPlan]:
    """The gradient graph and its seed space (batch compression for a scalar output)."""
    request, flat = state.request, state.flat
    reverse = trace_reverse(request, flat, state.forward)
    if flat.rows is not None:  # gradients (m,) + leaf shape for m > 1 outputs per example
        per_example = state.out_vals[0].numel() // flat.rows
        gradients = [0 if per_example == 1 else 1] * len(flat.diff)
        return reverse, row_seeds(shapes, [0, *gradients] + [0] * reverse.n_aux)
    if state.out_vals[0].numel() != 1:
        return reverse, SeedPlan(tuple(plain_segments(shapes)), ())

    @functools.cache  # priced as a candidate, then prepared again once chosen
    def prepared(plan: SeedPlan) -> tuple[fx.GraphModule, SeedPlan]:
        if request.order != 2:  # see hod._per_example: a Hessian's blocks only
            return reverse.gm, plan
        return with_per_example_terms(reverse.gm, flat.diff, plan)

    @functools.cache  # priced as a candidate, then against its last-leads twin
    def work(plan: SeedPlan) -> float:
        return price(*prepared(plan))

    def price(gm: fx.GraphModule, plan: SeedPlan) -> float:
        spans = {pos: (s.offset, s.offset + s.size)
                 for pos, s in zip(flat.diff, plan.segments, strict=True)}
        identities = frozenset(
            pos for pos, s in zip(flat.diff, plan.segments, strict=True) if s.batch_dim is None
        )
        return derivative_work(
            gm, spans, needs(Mode.REVERSE_LAST, 0, plan), request.order - 1, identities
        )

    chosen = plan_seeds(
        reverse.gm, flat.diff, shapes, gradients_of, work
    )
    gm, seeds = prepared(chosen)
    last_leads = with_row_blocks(gm, seeds, request.order)
    if last_leads is not None and price(*last_leads) < work(chosen):
        gm, seeds = last_leads
    return replace(reverse, gm=gm), seeds


def gradients_of(batch: dict[int, int]) -> list[int]:
    """The outputs of a reverse-last graph holding the gradients of the leaves of
    ``batch``: its compressed seeds are read from those (see :func:`needs`)."""
    return [1 + leaf for leaf in batch]


def needs(mode: Mode, n_diff: int, seeds: SeedPlan) -> list[Span | None]:
    """The seeds each differentiated output's derivatives must cover.

    Forward mode reads every seed of every output. Reverse-last reads a block
    ``(l1, ..., ln)`` from the gradient of its lead leaf (see
    :func:`hod._assemble.lead`), seeded by the others, whose segments come later: so the
    gradient of an uncompressed leaf needs only the seeds from its own segment on (the
    other blocks follow by symmetry).
    """
    full = (0, seeds.size)
    if mode is Mode.FORWARD:
        return [full] * n_diff
    if seeds.lead_last:  # see hod._row_blocks: pieced gradients are read from their pieces
        pieced = {p.leaf for p in seeds.pieces}
        ends = [None if leaf in pieced else (0, s.offset + s.size)
                for leaf, s in enumerate(seeds.segments)]
        for pieces in seeds.pieces:
            start = seeds.segments[pieces.leaf].offset
            ends += [(0, start + end) for end in itertools.accumulate(pieces.sizes)]
        return [None, *ends]
    compressed = [s for s in seeds.segments if s.batch_dim is not None]
    # With per-example terms, the blocks pairing a compressed leaf with an uncompressed
    # one come from those terms, seeded by the compressed leaves only.
    own = full
    if seeds.per_example:
        own = (min(s.offset for s in compressed), max(s.offset + s.size for s in compressed))
    needed: list[Span | None] = [None]
    for segment in seeds.segments:
        needed.append(own if segment.batch_dim is not None else (segment.offset, seeds.size))
    return needed + [own] * len(seeds.per_example)


def rows_apart(
    mode: Mode, traced: Traced, diff: Sequence[int], seeds: SeedPlan, *, h: int, n_diff: int
) -> bool:
    """Whether the rows of ``g``'s leaf ``h`` are independent examples (``g``'s blocks
    vanish unless their ``h`` slots sit on one row): compressed so, or they could be."""
    required = gradients_of if mode is Mode.REVERSE_LAST else (lambda batch: range(n_diff))
    return seeds.segments[h].batch_dim == 0 or valid_batch(traced.gm, diff, required, {h: 0})


def compact_rows(mode: Mode, seeds: SeedPlan, h: int) -> bool:
    """Whether ``g``'s blocks can hold one row of ``h`` (``block``'s ``compact``): in
    reverse-last mode, with ``h`` the one leaf compressed, along its rows."""
    compressed = [i for i, s in enumerate(seeds.segments) if s.batch_dim is not None]
    return mode is Mode.REVERSE_LAST and compressed == [h] and seeds.segments[h].batch_dim == 0
