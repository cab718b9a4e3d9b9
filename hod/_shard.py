"""API stage: cutting a seed space into chunks, and across the ranks of a process group.

A transform given ``chunk_size=c`` computes its derivative over the seed space (or its
directions, in Taylor mode) ``c`` seeds at a time; given ``group=``, a
``torch.distributed`` process group, each rank computes a contiguous slice of it and
gets back a :class:`~torch.distributed.tensor.DTensor`. This module holds what the
transforms share: the checks of both keywords, which seeds a rank owns, and the
DTensor wrapping (``Shard`` along the dim a rank's slice indexes, ``Replicate`` for what
every rank computes whole, ``Partial`` for sums over directions).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import InputError, MemoryLimitError


def check_chunk_size(call: str, chunk_size: Any) -> None:
    """Refuse a ``chunk_size`` that is not None or a positive int."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(
            f"{call}: chunk_size must be a positive integer (seeds per chunk) or None, "
            f"got {chunk_size!r}.\n  Fix: e.g. chunk_size=256."
        )


def check_group(call: str, group: Any) -> None:
    """Refuse a ``group`` that is not None or a process group of an initialized
    ``torch.distributed``."""
    if group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InputError(
            f"{call}: group= needs torch.distributed to be initialized.\n"
            f"  Fix: call torch.distributed.init_process_group(...) first (torchrun sets "
            f"the environment it reads), or drop group=."
        )
    if not isinstance(group, dist.ProcessGroup):
        raise InputError(
            f"{call}: group must be a torch.distributed ProcessGroup, got "
            f"{type(group).__name__}.\n"
            f"  Fix: pass torch.distributed.group.WORLD or a group from new_group()."
        )


def chunk_estimate(error: MemoryLimitError, seeds: int) -> int | None:
    """The chunk of ``seeds`` that would bring ``error``'s tensor under the limit if it
    shrank with the chunk (a tensor over the seed space does); None when none would."""
    nbytes, limit = error.nbytes, error.limit
    if nbytes is None or limit is None or error.hinted:
        return None
    chunk = seeds * limit // nbytes
    return chunk if 1 <= chunk < seeds else None


def with_chunk_hint(error: MemoryLimitError, seeds: int,
                    chunk: int | None = None) -> MemoryLimitError:
    """``error`` suggesting ``chunk_size=chunk`` (by default :func:`chunk_estimate`);
    ``error`` itself when there is no chunk to suggest."""
    chunk = chunk_estimate(error, seeds) if chunk is None else chunk
    if chunk is None:
        return error
    return MemoryLimitError(
        f"{error}\n  Or: pass chunk_size={chunk} (or less): the same result, computed "
        f"{chunk} of the {seeds} seeds at a time, in tensors that shrink with the chunk.",
        nbytes=error.nbytes, limit=error.limit, hinted=True,
    )


def rank_rows(size: int, rank: int, world: int) -> range:
    """The rows of a dim of ``size`` that ``rank`` holds when it is sharded over
    ``world`` ranks the way :class:`~torch.distributed.tensor.Shard` cuts it
    (``torch.chunk``: ``ceil(size / world)`` rows per rank, the last ranks short or
    empty)."""
    per = -(-size // world)
    return range(min(size, rank * per), min(size, (rank + 1) * per))


def chunked(seeds: Sequence[int], chunk_size: int | None) -> Iterator[Sequence[int]]:
    """``seeds`` in consecutive chunks of at most ``chunk_size`` (all at once for None);
    one empty chunk when there are none."""
    step = max(1, len(seeds)) if chunk_size is None else chunk_size
    for lo in range(0, max(1, len(seeds)), step):
        yield seeds[lo:lo + step]


class Placement:
    """Where the ranks of a process group hold a result's pieces (see :func:`place`)."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def shard(self, local: torch.Tensor, dim: int, shape: Sequence[int]) -> Any:
        """The DTensor of global ``shape`` whose ``dim`` is split over the ranks
        (:func:`rank_rows`), this rank holding ``local``."""
        from torch.distributed.tensor import Shard

        return self._wrap(local, Shard(dim), shape)

    def replicate(self, whole: torch.Tensor) -> Any:
        """The DTensor every rank holds whole."""
        from torch.distributed.tensor import Replicate

        return self._wrap(whole, Replicate(), whole.shape)

    def partial(self, local: torch.Tensor) -> Any:
        """The DTensor that is the sum of every rank's ``local``."""
        from torch.distributed.tensor import Partial

        return self._wrap(local, Partial("sum"), local.shape)

    def _wrap(self, local: torch.Tensor, placement: Any, shape: Sequence[int]) -> Any:
        from torch.distributed.tensor import DTensor

        shape = torch.Size(shape)
        return DTensor.from_local(
            local, _mesh(self.group, local.device.type), [placement], run_check=False,
            shape=shape, stride=_contiguous_strides(shape),
        )


@functools.lru_cache(maxsize=16)
def _mesh(group: Any, device_type: str) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device_type)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
