"""Set partitions and subsets used by Faà di Bruno's formula and Leibniz's rule."""

from __future__ import annotations

from functools import cache
from itertools import combinations
from math import comb

Block = tuple[int, ...]


@cache
def set_partitions(m: int) -> tuple[tuple[Block, ...], ...]:
    """All partitions of ``{0, ..., m-1}`` into blocks; blocks and their elements are sorted."""
    if m == 0:
        return ((),)
    result = []
    for partition in set_partitions(m - 1):
        last = m - 1
        result.append(partition + ((last,),))
        for i, block in enumerate(partition):
            grown = partition[:i] + (block + (last,),) + partition[i + 1 :]
            result.append(grown)
    return tuple(tuple(sorted(p)) for p in result)


@cache
def subsets(m: int) -> tuple[tuple[Block, Block], ...]:
    """All splits of ``{0, ..., m-1}`` into an ordered pair ``(chosen, rest)``."""
    everything = tuple(range(m))
    splits = []
    for size in range(m + 1):
        for chosen in combinations(everything, size):
            rest = tuple(i for i in everything if i not in chosen)
            splits.append((chosen, rest))
    return tuple(splits)


@cache
def partition_kinds(m: int) -> tuple[tuple[tuple[Block, ...], int], ...]:
    """One partition of ``{0, ..., m-1}`` per multiset of block sizes, with how many
    partitions share those sizes. The one given has blocks of consecutive positions,
    largest first (its factors then broadcast over whole runs of leading axes)."""
    counts: dict[tuple[int, ...], int] = {}
    for partition in set_partitions(m):
        sizes = tuple(sorted((len(b) for b in partition), reverse=True))
        counts[sizes] = counts.get(sizes, 0) + 1
    kinds = []
    for sizes, count in counts.items():
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        blocks = tuple(tuple(range(s, s + n)) for s, n in zip(starts, sizes, strict=True))
        kinds.append((blocks, count))
    return tuple(kinds)


@cache
def subset_sizes(m: int) -> tuple[tuple[Block, Block, int], ...]:
    """One split ``(chosen, rest)`` of ``{0, ..., m-1}`` per size of ``chosen``, with how
    many splits have that size."""
    return tuple(
        (tuple(range(j)), tuple(range(j, m)), comb(m, j)) for j in range(m + 1)
    )
