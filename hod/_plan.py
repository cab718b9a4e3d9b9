"""The planner: forward or reverse-last, and which inputs to seed compressed by batch.

The mode: forward costs about ``S^n`` sweeps through the graph at seed width 1;
reverse-last about ``REVERSE_COST * m * S^(n-1)`` for an output of ``m`` elements.
Compressing a batch dim divides a leaf's share of ``S`` by the batch size. The candidate
seed plans are the plain seeds and the compressions that keep every block the plan must
read valid (see :mod:`hod._analysis`); the planner keeps the one of least ``cost``: the
smallest ``S`` by default, and for reverse-last the work :mod:`hod._cost` estimates, which
also sees how far back each gradient needs each seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import fx

from ._analysis import track_batch
from ._records import MIXED, Mode, SeedPlan, Segment

#: One reverse sweep costs about this many forward sweeps.
REVERSE_COST = 3


def plain_segments(shapes: Sequence[tuple[int, ...]]) -> list[Segment]:
    """Uncompressed segments, one after another."""
    segments, offset = [], 0
    for shape in shapes:
        segments.append(Segment(offset, tuple(shape)))
        offset += segments[-1].size
    return segments


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
                candidates.append(_seed_plan(gm, diff_positions, shapes, batch, size))
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


def _seed_plan(gm, diff_positions, shapes, batch: dict[int, int], size: int) -> SeedPlan:
    segments, offset = [], 0
    for leaf, shape in enumerate(shapes):
        dim = batch.get(leaf)
        segment = Segment(offset, tuple(shape), dim, size if dim is not None else 1)
        segments.append(segment)
        offset += segment.size
    states = track_batch(gm, {diff_positions[leaf]: dim for leaf, dim in batch.items()})
    return SeedPlan(tuple(segments), tuple(states))


def choose_mode(order: int, out_sizes: Sequence[int], seed_size: int) -> Mode:
    """Reverse-last for one output small against the seed space, else forward."""
    if len(out_sizes) == 1 and REVERSE_COST * out_sizes[0] <= seed_size:
        return Mode.REVERSE_LAST
    return Mode.FORWARD
