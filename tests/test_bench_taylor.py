"""The taylor sweep's plumbing on tiny rows: every kind of row is checked against float64
torch.func (hod and torch.func pass, a 1% error fails), the floor is timed but not checked,
jet-for-pytorch without its environment is reported absent, and the table has the ratios."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench.engines import Runner, Warmup
from bench.runner import ABSENT, OK, UNCHECKED, WRONG
from bench.tables import taylor_grid
from bench.taylor import (
    FloorEngine,
    HodTaylorEngine,
    JetProcess,
    JetTaylorEngine,
    TaylorEngine,
    TorchFuncTaylorEngine,
    run_taylor_sweep,
)
from bench.taylor_rows import DIRECTIONS, TaylorRow, make_inputs
from bench.timing import RepPolicy

TINY_ROWS = (
    TaylorRow("laplacian", (4, 8, 8, 1), 3),
    TaylorRow("biharmonic", (3, 6, 1), 2),
    TaylorRow("stochastic", (4, 8, 1), 3, samples=2),
    TaylorRow("hvp", (3, 5, 2), 4),
    TaylorRow("pinn", (4, 8, 1), 3),
)
FEW_CALLS = RepPolicy(min_reps=2, max_reps=2, target_s=0.0)


class _OnePercentOffRunner(Runner):
    def __init__(self, inner: Runner) -> None:
        self.inner = inner

    def warmup(self) -> Warmup:
        warm = self.inner.warmup()
        return Warmup({k: 1.01 * v for k, v in warm.blocks.items()}, warm.seconds)

    def time_call(self) -> float:
        return self.inner.time_call()


class _OnePercentOff(TaylorEngine):
    """torch.func's result times 1.01: the check must fail it on every row."""

    name = peer = "off"

    def describe(self) -> str:
        return "torch.func x 1.01"

    def prepare(self, row: TaylorRow, inputs: dict[str, Any]) -> Runner:
        return _OnePercentOffRunner(TorchFuncTaylorEngine().prepare(row, inputs))


@pytest.fixture
def sweep(monkeypatch, tmp_path) -> dict[str, Any]:
    monkeypatch.setenv("THOAD_PYTHON", str(tmp_path / "no-such-python"))
    engines = [HodTaylorEngine(), JetTaylorEngine("collapsed", JetProcess(timeout_s=10.0)),
               TorchFuncTaylorEngine(), _OnePercentOff(), FloorEngine()]
    result, versions = run_taylor_sweep(FEW_CALLS, rows_to_run=TINY_ROWS, engines=engines,
                                        log=lambda _: None)
    assert "no Python 3.12 environment" in versions["jet[collapsed]"]
    return result


def test_every_row_is_checked_and_a_one_percent_error_fails(sweep):
    assert [r["label"] for r in sweep["rows"]] == [r.label() for r in TINY_ROWS]
    for row in sweep["rows"]:
        engines = row["engines"]
        for name in ("hod", "torch.func"):
            assert engines[name]["status"] == OK, (row["label"], name, engines[name]["detail"])
            assert engines[name]["check_rel_err"] < 1e-4
            assert len(engines[name]["times_ms"]) == 2
        assert engines["off"]["status"] == WRONG
        assert engines["off"]["median_ms"] is None
        assert engines["floor"]["status"] == UNCHECKED
        assert engines["floor"]["median_ms"] > 0
        assert engines["jet[collapsed]"]["status"] == ABSENT


def test_the_table_has_hods_ratios_and_the_floor(sweep):
    grid = taylor_grid(sweep)
    header, first = grid[0], grid[1]
    assert header[-4:] == ["hod vs jet", "hod vs torch.func", "hod vs off", "hod / floor"]
    assert first[header.index("jet[collapsed]")] == ABSENT
    assert first[header.index("off")] == WRONG
    assert first[-4] == first[-2] == "-"  # no ratio over an absent or a wrong engine
    assert first[-3].endswith("x") and first[-1].endswith("x")


def test_jet_has_no_hvp_and_the_directions_differ_per_engine():
    engine = JetTaylorEngine("standard", JetProcess(timeout_s=10.0))
    assert "no Hessian-vector product" in engine.unsupported_reason(TINY_ROWS[3])
    assert engine.unsupported_reason(TINY_ROWS[2]) is None
    engine.shutdown()
    inputs = make_inputs(TINY_ROWS[2], 0)
    for name in DIRECTIONS:
        V = inputs[name]
        assert V.shape == (3, 2, 4) and set(V.unique().tolist()) <= {-1.0, 1.0}
    assert not torch.equal(inputs["V"], inputs["V_hod"])
