"""A launcher for tests of ``group=``: run a function on every rank of a gloo process
group of CPU processes (torch.multiprocessing, spawn) and collect what each returns.

Each process start costs seconds (it imports torch and hod), so a test should run all
it needs in one launch. The worker must be a module-level function (spawn pickles it by
name) taking ``(rank, world, *args)``; what it returns (tensors, numbers, strings) is
saved with ``torch.save`` and loaded back in the parent, one value per rank.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(worker: Callable[..., Any], world: int = 2, *args: Any) -> list[Any]:
    """``[worker(rank, world, *args) for rank in range(world)]``, each on its own process
    of one gloo group (its ``torch.distributed.group.WORLD``)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world, worker, args, folder), nprocs=world, join=True)
        return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False)
                for rank in range(world)]


def _rank_main(rank: int, world: int, worker: Callable[..., Any], args: tuple,
               folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}",
                            rank=rank, world_size=world)
    try:
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # The result is saved; torch 2.13's interpreter exit after a gloo group sometimes
    # aborts ("terminate called without an active exception"), so skip that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
