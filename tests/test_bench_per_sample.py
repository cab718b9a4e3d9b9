"""The per-sample sweep at its ``--quick`` sizes: vmap(hod), vmap(torch.func) and hod of the
summed batched function pass the float64 check on every row, hod ran its batched code for
the whole batch, a 1% error and hod's fallback to functorch's batching fail, and the table
has the ratios; the summed function's reference layout is torch.func's; the benchmarks page
shows the latest committed per-sample run."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bench import per_sample_rows as rows
from bench.engines import CallableRunner, Runner, torch_func_derivative
from bench.per_sample import (
    BatchedHodRunner,
    PerSampleHodEngine,
    PerSampleTorchFuncEngine,
    make_per_sample_engines,
    run_per_sample_sweep,
    selected_rows,
)
from bench.per_sample_rows import PerSampleRow
from bench.runner import OK, WRONG
from bench.tables import per_sample_grid
from bench.timing import RepPolicy

FEW_CALLS = RepPolicy(min_reps=2, max_reps=2, target_s=0.0)


class _OnePercentOff(PerSampleTorchFuncEngine):
    """vmap of torch.func times 1.01: the check must fail it on every row."""

    name = peer = "off"

    def prepare(self, row: PerSampleRow, inputs: dict[str, Any], device: str) -> Runner:
        per_sample = rows.torch_func_per_sample(rows.single(row, inputs["params"]), row.order)
        return CallableRunner(lambda: 1.01 * per_sample(inputs["X"]), row, device)


class _FunctorchBatched:
    """Right per-sample derivatives, from code that says it is not hod's batched code."""

    def __init__(self, f_single, order: int) -> None:
        self._derivative = torch_func_derivative(f_single, order, 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._derivative(x)

    def lower(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(examples=None)


class _FallsBack(PerSampleHodEngine):
    name = peer = "fallback"

    def prepare(self, row: PerSampleRow, inputs: dict[str, Any], device: str) -> Runner:
        f_single = rows.single(row, inputs["params"])
        return BatchedHodRunner(_FunctorchBatched(f_single, row.order), inputs["X"], row)


@pytest.fixture(scope="module")
def sweep() -> dict[str, Any]:
    engines = [*make_per_sample_engines(), _OnePercentOff(), _FallsBack()]
    result, versions = run_per_sample_sweep(FEW_CALLS, quick=True, engines=engines,
                                            log=lambda _: None)
    assert versions["hod"].startswith("hod ")
    return result


def test_every_row_is_checked_and_hod_runs_its_batched_code(sweep):
    quick_rows = selected_rows(quick=True)
    assert [r["label"] for r in sweep["rows"]] == [r.label() for r in quick_rows]
    assert {r.order for r in quick_rows} == {1, 2, 3}
    assert {r.model for r in quick_rows} == {"tanh", "seed"}
    for row, spec in zip(sweep["rows"], quick_rows, strict=True):
        engines = row["engines"]
        for name in ("hod", "torch.func", "hod.summed"):
            assert engines[name]["status"] == OK, (row["label"], name, engines[name]["detail"])
            assert engines[name]["check_rel_err"] < 1e-4
            assert len(engines[name]["times_ms"]) == 2
        assert row["examples"] == spec.batch
        assert f"lowered.examples={spec.batch}" in engines["hod"]["detail"]


def test_a_one_percent_error_and_the_fallback_fail_and_are_not_timed(sweep):
    for row in sweep["rows"]:
        for name in ("off", "fallback"):
            result = row["engines"][name]
            assert result["status"] == WRONG, (row["label"], name)
            assert result["median_ms"] is None and not result["times_ms"]
        # The fallback's values are right: only the missing batched code fails it.
        assert "not hod's batched code" in row["engines"]["fallback"]["detail"]
        assert "1/1 blocks compared" in row["engines"]["fallback"]["detail"]


def test_the_table_has_hods_ratios_and_examples(sweep):
    grid = per_sample_grid(sweep)
    header, first = grid[0], grid[1]
    assert header[:4] == ["row", "hod", "torch.func", "hod.summed"]
    assert header[-1] == "lowered.examples"
    ratio = first[header.index("hod vs torch.func")]
    medians = {n: r["median_ms"] for n, r in sweep["rows"][0]["engines"].items()}
    assert ratio == f"{medians['torch.func'] / medians['hod']:.2f}x"
    assert first[header.index("hod vs off")] == "-"  # no ratio over a wrong engine
    assert first[-1] == str(sweep["rows"][0]["examples"])


@pytest.mark.parametrize("row", [PerSampleRow("tanh", (3, 5, 2), 4, 2),
                                 PerSampleRow("tanh", (3, 4, 1), 3, 3),
                                 PerSampleRow("seed", (4, 4, 4), 3, 2)], ids=str)
def test_the_summed_reference_is_torch_funcs_derivative_of_the_summed_function(row):
    inputs = rows.make_inputs(row, 0)
    f64 = rows.single(row, tuple(p.double() for p in inputs["params"]))
    full = torch_func_derivative(rows.summed(f64), row.order, 0)(inputs["X"].double())
    laid_out = rows.block_diagonal(rows.reference(row, inputs), row.order)
    assert laid_out.shape == full.shape
    torch.testing.assert_close(laid_out, full, rtol=1e-10, atol=1e-12)
