"""The chunks sweep at tiny sizes: every chunked setting of the memory row is checked against
torch.func in float64 and timed, runs in the chunks it says, and has a peak above the baseline
from its own child; a 1% error fails and is not timed; the distributed rows run under torchrun
with gloo on 1 and 2 processes, each rank holding its share of a DTensor whose whole equals
the float64 reference and the 1-process result; the tables show the peak ratio and the
shares; a child's peak is its own, not its parent's; the benchmarks page shows the latest
committed chunks run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import chunks
from bench.chunks_rows import DistributedRow, MemoryRow, peak_rss_mib
from bench.runner import OK, WRONG
from bench.tables import chunks_distributed_grid, chunks_memory_grid
from bench.timing import RepPolicy

ROOT = Path(__file__).resolve().parents[1]
FEW_CALLS = RepPolicy(min_reps=2, max_reps=2, target_s=0.0)
MEMORY = MemoryRow(20, 300, (7,))
TINY_MLP = (3, 5, 4)  # 49 parameters
ROWS = [DistributedRow(TINY_MLP, 16, 1),
        DistributedRow(TINY_MLP, 16, 2, chunk_size=10, group=True)]


@pytest.fixture(scope="module")
def sweep() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result, versions = chunks.run_chunks_sweep(FEW_CALLS, threads=1, memory_row=MEMORY,
                                                   rows=ROWS, calls=2, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert versions["hod"].startswith("hod ")
    return result


def test_every_chunk_setting_is_checked_timed_and_measured(sweep):
    memory = sweep["rows"][0]
    assert memory["part"] == "memory" and list(memory["engines"]) == ["hod", "hod chunk_size=7"]
    assert memory["baseline_mib"] > 0
    for name, result in memory["engines"].items():
        assert result["status"] == OK, (name, result["detail"])
        assert result["check"].startswith("ok:") and result["check_rel_err"] < 2e-5
        assert len(result["times_ms"]) == 2 and result["median_ms"] > 0
        assert result["memory_status"] == "ok", result["memory_detail"]
        assert result["peak_mib"] > 100 and result["above_baseline_mib"] is not None
    assert (memory["engines"]["hod"]["chunks"], memory["engines"]["hod"]["width"]) == (1, 20)
    chunked = memory["engines"]["hod chunk_size=7"]
    assert (chunked["chunks"], chunked["width"]) == (3, 7)  # 7 + 7 + 6 seeds


def test_a_one_percent_error_fails_and_is_not_timed(monkeypatch):
    import hod

    exact = hod.hessian

    def off(f, *args, **kwargs):
        fn = exact(f, *args, **kwargs)
        wrong = lambda x: 1.01 * fn(x)  # noqa: E731
        wrong.lower = fn.lower
        return wrong

    monkeypatch.setattr(hod, "hessian", off)
    monkeypatch.setattr(chunks, "child_peak", lambda *_: {"status": "ok", "peak_mib": 1.0})
    row = chunks.run_memory_row(MEMORY, FEW_CALLS, log=lambda _: None)
    for name, result in row["engines"].items():
        assert result["status"] == WRONG, name
        assert result["median_ms"] is None and not result["times_ms"]


def test_the_distributed_rows_hold_their_shares_of_the_whole(sweep):
    distributed = sweep["rows"][1]
    results = distributed["engines"]
    assert list(results) == [r.label() for r in ROWS]
    single, sharded = results[ROWS[0].label()], results[ROWS[1].label()]
    for result in (single, sharded):
        assert result["status"] == OK, result["detail"]
        assert result["check_rel_err"] < 2e-5 and result["vs_single_rel"] < 2e-5
        assert len(result["times_ms"]) == 2 and result["median_ms"] > 0
        assert result["peak_above_baseline_mib"] >= 0
    assert single["share"] == 1.0 and single["result_type"] == "Tensor"
    assert sharded["result_type"] == "DTensor"
    assert sharded["rank_shares"] == [25 / 49, 24 / 49]
    # a scalar's Hessian is symmetric: hod shards its rows (dim 0), as its chunks compute them
    assert sharded["local_shapes"] == [[25, 49], [24, 49]]


def test_the_tables_give_the_peak_ratio_and_the_shares(sweep):
    memory, distributed = sweep["rows"]
    grid = chunks_memory_grid(memory)
    assert grid[0][4] == "peak vs unchunked"
    unchunked = memory["engines"]["hod"]["above_baseline_mib"]
    chunked = memory["engines"]["hod chunk_size=7"]["above_baseline_mib"]
    assert grid[1][:2] == ["hod", "1 x 20"] and grid[2][:2] == ["hod chunk_size=7", "3 x 7"]
    if unchunked:
        assert grid[2][4] == f"{chunked / unchunked:.2f}"
    rows = chunks_distributed_grid(distributed)
    assert [r[:2] for r in rows[1:]] == [["hod.hessian(f)", "1"],
                                          ["hod.hessian(f, group=WORLD, chunk_size=10)", "2"]]
    assert [r[4] for r in rows[1:]] == ["1.00", "0.51"]


def test_a_childs_peak_is_its_own_not_its_parents():
    # A child's ru_maxrss starts at its parent's resident size; VmHWM does not.
    ballast = torch.ones(64 * 2**20)  # 256 MiB resident in this process
    ballast.add_(1)
    code = "from bench.chunks_rows import peak_rss_mib; print(peak_rss_mib())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert float(out) < peak_rss_mib() - 128, out
