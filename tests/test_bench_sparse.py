"""The sparse sweep at tiny sizes: every engine (hod sparse, hod dense, dense torch.func, the
hand-coloured torch.func baseline) on every problem is checked against torch.func in float64
and timed; hod's pattern, colours and stored entries are reported; a 1% error, a missing
nonzero or a wrong shape fails and is not timed; a dense engine past the address-space cap
fails with OOM; the table gives hod sparse's speedups from the medians; the sweep runs by name
only; the benchmarks page shows the latest committed sparse run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench import sparse
from bench.engines import failure_kind
from bench.run import OWN_ENGINE_SWEEPS, select_sweeps
from bench.runner import OK, WRONG
from bench.sparse_rows import SparseRow
from bench.tables import SPARSE, sparse_grid
from bench.timing import RepPolicy

FEW_CALLS = RepPolicy(min_reps=2, max_reps=2, target_s=0.0)
ROWS = [SparseRow("bratu", 6), SparseRow("rosenbrock", 20), SparseRow("banded", 20),
        SparseRow("energy", 30), SparseRow("conv", 25)]
#: The fewest colours any valid colouring has on the regular rows: a Jacobian row's nonzeros
#: (the 5-point stencil's, the width-7 kernel's) all differ, as do a tridiagonal Hessian's.
COLOURS = {"bratu": 5, "rosenbrock": 3, "conv": 7}


@pytest.fixture(scope="module")
def sweep() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result, versions = sparse.run_sparse_sweep(FEW_CALLS, rows=ROWS, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert versions[sparse.HOD_SPARSE].startswith("hod ")
    return result


def test_every_engine_is_checked_and_timed_on_every_row(sweep):
    assert sweep["kind"] == SPARSE and [r["case"] for r in sweep["rows"]] == [
        r.to_dict() for r in ROWS]
    for row in sweep["rows"]:
        assert list(row["engines"]) == list(sparse.ENGINES)
        for name, result in row["engines"].items():
            assert result["status"] == OK, (row["label"], name, result["detail"])
            assert result["check"].startswith("ok:") and result["check_rel_err"] < 1e-5
            assert len(result["times_ms"]) == 2 and result["median_ms"] > 0


def test_the_pattern_colours_and_stored_entries_are_reported(sweep):
    for row, case in zip(sweep["rows"], ROWS, strict=True):
        assert row["n"] == case.n and row["first_call_ms"] > 0
        # the pattern holds every nonzero of the float64 reference, and hod stores no more
        assert row["nnz"] >= row["reference_nnz"] > 0
        assert row["stored"] == row["nnz"]
        if case.problem in COLOURS:
            assert COLOURS[case.problem] <= row["colours"] < case.n, row["label"]
    bratu = sweep["rows"][0]
    assert bratu["nnz"] == 5 * 36 - 4 * 6  # the 5-point stencil on 6 x 6, boundary cut


def test_a_one_percent_error_fails_and_is_not_timed(monkeypatch):
    import hod

    exact = hod.hessian

    def off(f, *args, **kwargs):
        fn = exact(f, *args, **kwargs)

        def wrong(x):
            return 1.01 * fn(x)

        wrong.lower = fn.lower
        return wrong

    monkeypatch.setattr(hod, "hessian", off)
    row = sparse.run_row(SparseRow("rosenbrock", 12), FEW_CALLS, log=lambda _: None)
    for name in (sparse.HOD_SPARSE, sparse.HOD_DENSE):
        result = row["engines"][name]
        assert result["status"] == WRONG and result["check"].startswith("WRONG"), name
        assert result["median_ms"] is None and not result["times_ms"]
    assert row["engines"][sparse.TORCH_FUNC]["status"] == OK


def test_a_missing_nonzero_or_a_wrong_shape_fails():
    row = SparseRow("conv", 10)
    ref = sparse.reference(row)
    dense = ref.to_dense().float()
    assert sparse.check(dense, ref)[0] and sparse.check(dense.to_sparse(), ref)[0]
    dropped = dense.clone()
    dropped[3, 4] = 0.0
    assert not sparse.check(dropped.to_sparse(), ref)[0]
    assert not sparse.check(dense[:, :-1], ref)[0]
    nan = dense.clone()
    nan[0, 0] = float("nan")
    assert not sparse.check(nan, ref)[0]


def test_an_allocation_past_the_cap_is_out_of_memory():
    with pytest.raises(RuntimeError) as caught, sparse.address_space_cap(0.25):
        torch.ones(2 ** 28)  # 1 GiB
    assert failure_kind(caught.value) == "OOM"
    torch.ones(2 ** 27)  # the cap is lifted after the block


def test_the_table_gives_the_speedups_from_the_medians(sweep):
    grid = sparse_grid(sweep)
    header = grid[0]
    assert header[-2:] == ["vs dense torch.func", "vs hand-coloured"]
    for row, cells in zip(sweep["rows"], grid[1:], strict=True):
        medians = {name: r["median_ms"] for name, r in row["engines"].items()}
        ours = medians[sparse.HOD_SPARSE]
        assert cells[header.index(sparse.HOD_SPARSE)] == f"{ours:.3f}"
        dense, hand = medians[sparse.TORCH_FUNC] / ours, medians[sparse.HAND] / ours
        assert float(cells[-2].rstrip("x")) == pytest.approx(dense, rel=0.005, abs=0.005)
        assert float(cells[-1].rstrip("x")) == pytest.approx(hand, rel=0.005, abs=0.005)
        assert cells[header.index("stored / nnz")] == "1.00"


def test_the_sweep_runs_by_name_only():
    assert SPARSE in OWN_ENGINE_SWEEPS
    assert select_sweeps(SPARSE) == [] and all(s.name != SPARSE for s in select_sweeps("all"))
