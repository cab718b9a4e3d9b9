"""The ``per-sample`` sweep: per-sample derivatives under ``torch.func.vmap``
(:mod:`bench.per_sample_rows`). Run it with ``python -m bench.run --sweeps per-sample``.

Engines, on every row:

* ``hod``: ``vmap(hod.hessian(f_single))(X)`` (``hod.jacobian`` at order 1,
  ``hod.derivative(f_single, 3)`` at order 3), which hod runs as its own batched code; its
  first call is checked, and so is that the code it ran was batched: ``lowered.examples`` of
  the code ``.lower()`` gives under the same vmap must be the batch (None would mean that hod
  fell back to functorch's batching of its unbatched code, and the check fails);
* ``torch.func``: ``vmap`` of the matching torch.func nesting (:func:`~bench.per_sample_rows.
  torch_func_per_sample`);
* ``hod.summed``: the same hod transform of the summed batched function
  (:func:`~bench.per_sample_rows.summed`), where hod finds the independence of the examples
  itself; its result, block diagonal over the examples, is checked against the reference laid
  out so (:func:`~bench.per_sample_rows.block_diagonal`).

Per row, as in the other sweeps (:mod:`bench.runner`): the float64 reference, every engine's
first call checked against it (:func:`bench.compare.compare_blocks`; a wrong engine is not
timed), then interleaved timing (:func:`bench.timing.interleaved`), medians in the result file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.func import vmap

from bench.compare import Blocks
from bench.engines import CallableRunner, Engine, HodEngine, Runner, Warmup
from bench.per_sample_rows import (
    DERIVATIVE_NAMES,
    PER_SAMPLE_ROWS,
    PerSampleRow,
    block_diagonal,
    make_inputs,
    reference,
    single,
    summed,
    torch_func_per_sample,
)
from bench.reference import Reference
from bench.runner import (
    WRONG,
    EngineResult,
    RowResult,
    RunSettings,
    SweepRunner,
    _row_line,
    row_seed,
)
from bench.tables import HOD, PER_SAMPLE, per_sample_grid, problem_notes
from bench.timing import RepPolicy

TITLE = "per-sample derivatives under torch.func.vmap: vmap(hod) vs vmap(torch.func)"
Inputs = dict[str, Any]


def hod_transform(hod: Any, f: Callable, order: int) -> Callable:
    """The hod transform a row names: jacobian, hessian, or derivative(f, order) beyond."""
    if order == 1:
        return hod.jacobian(f)
    return hod.hessian(f) if order == 2 else hod.derivative(f, order)


def batched_examples(transformed: Any, X: Tensor) -> int | None:
    """``lowered.examples`` of the code ``transformed.lower`` gives under ``vmap`` over ``X``'s
    rows: the number of examples of hod's batched code, None for its unbatched code."""
    lowered: list[Any] = []

    def lower_one(x: Tensor) -> Tensor:
        lowered.append(transformed.lower(x))
        return x.sum()

    vmap(lower_one)(X)
    return lowered[0].examples


class BatchedHodRunner(CallableRunner):
    """``vmap(transformed)(X)``; after the first call it records ``examples``
    (:func:`batched_examples`) and says it in the warm-up's note."""

    def __init__(self, transformed: Any, X: Tensor, row: PerSampleRow) -> None:
        super().__init__(lambda: vmap(transformed)(X), row, "cpu")
        self.examples: int | None = None
        self._transformed, self._X = transformed, X

    def warmup(self) -> Warmup:
        warm = super().warmup()
        self.examples = batched_examples(self._transformed, self._X)
        warm.note = f"lowered.examples={self.examples}"
        return warm


class PerSampleHodEngine(HodEngine):
    """``vmap(hod.<transform>(f_single))(X)``: hod's batched code under vmap."""

    def describe(self) -> str:
        return ("vmap(hod.hessian(f_single))(X); hod.jacobian at order 1, "
                "hod.derivative(f_single, 3) at order 3")

    def prepare(self, row: PerSampleRow, inputs: Inputs, device: str) -> Runner:
        transformed = hod_transform(self._module, single(row, inputs["params"]), row.order)
        return BatchedHodRunner(transformed, inputs["X"], row)


class SummedHodEngine(HodEngine):
    """The same hod transform of the summed batched function, on the whole batch."""

    name = peer = "hod.summed"

    def describe(self) -> str:
        return ("hod.hessian (order 1: hod.jacobian, 3: hod.derivative(., 3)) of the summed "
                "batched function X -> vmap(f_single)(X).sum(0), not under vmap: the sum is "
                "over the batch only, so on a vector-output row it keeps the output vector "
                "(a full sum would mix the outputs; the batched function itself would hold "
                "batch times more zeros)")

    def prepare(self, row: PerSampleRow, inputs: Inputs, device: str) -> Runner:
        transformed = hod_transform(self._module, summed(single(row, inputs["params"])),
                                    row.order)
        return CallableRunner(lambda: transformed(inputs["X"]), row, device)


class PerSampleTorchFuncEngine(Engine):
    """``vmap`` of nested torch.func."""

    name = peer = "torch.func"

    def describe(self) -> str:
        return ("vmap(torch.func.hessian(f_single))(X); jacrev at order 1, "
                "jacfwd(jacfwd(jacrev(f_single))) at order 3")

    def prepare(self, row: PerSampleRow, inputs: Inputs, device: str) -> Runner:
        per_sample = torch_func_per_sample(single(row, inputs["params"]), row.order)
        return CallableRunner(lambda: per_sample(inputs["X"]), row, device)


def make_per_sample_engines() -> list[Engine]:
    """hod under vmap, torch.func under vmap, hod on the summed batched function."""
    return [PerSampleHodEngine(), PerSampleTorchFuncEngine(), SummedHodEngine()]


def expected(engine: Engine, row: PerSampleRow, per_sample: Tensor) -> Reference:
    """What ``engine``'s first call is checked against: the per-sample reference, laid out
    block diagonally for :class:`SummedHodEngine`."""
    ref = block_diagonal(per_sample, row.order) if isinstance(engine, SummedHodEngine) \
        else per_sample
    blocks: Blocks = {(0,) * row.order: ref}
    scale = float(ref.abs().max())
    return Reference(blocks, scale, scale)


def run_per_sample_row(row: PerSampleRow, sweep: SweepRunner) -> tuple[RowResult, int | None]:
    """Check and time ``sweep``'s engines on one row; with ``lowered.examples`` of the code of
    the engine named ``hod`` (None when it did not run)."""
    start = time.perf_counter()
    inputs = make_inputs(row, row_seed(row, sweep.settings.seed))
    per_sample = reference(row, inputs)
    results: dict[str, EngineResult] = {}
    runners: dict[str, Runner] = {}
    examples = None
    for engine in sweep.engines:
        skipped = sweep._skip_reason(engine, row, over_budget={})
        if skipped is not None:
            results[engine.name] = skipped
            continue
        ref = expected(engine, row, per_sample)
        result, runner = sweep._warm_up(engine, row, inputs, ref)
        results[engine.name] = result
        if isinstance(runner, BatchedHodRunner):
            if engine.name == HOD:
                examples = runner.examples
            if runner.examples is None:
                result.status = WRONG
                result.detail = ("not hod's batched code (lowered.examples is None: "
                                 f"functorch batched the unbatched code); {result.detail}")
                runner.close()
                continue
        if runner is not None:
            runners[engine.name] = runner
    del per_sample
    sweep._time(runners, results)
    for runner in runners.values():
        runner.close()
    reference_note = f"torch.func in float64: vmap of {DERIVATIVE_NAMES[row.order]}"
    return RowResult(row, row.label(), results, reference_note,
                     time.perf_counter() - start), examples


def selected_rows(quick: bool) -> list[PerSampleRow]:
    """Every row, or at ``--quick`` every row's :meth:`~PerSampleRow.quick` form, once."""
    return list(dict.fromkeys(r.quick() for r in PER_SAMPLE_ROWS)) if quick \
        else list(PER_SAMPLE_ROWS)


def run_per_sample_sweep(
    policy: RepPolicy, seed: int = 0, quick: bool = False, log: Callable[[str], None] = print,
    rows_to_run: list[PerSampleRow] | None = None, engines: list[Engine] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The rows (default :func:`selected_rows`) with ``engines`` (default
    :func:`make_per_sample_engines`); the sweep in the result file's form, and the engines'
    versions (or why each is absent). Per row, ``examples`` is hod's ``lowered.examples``."""
    engines = make_per_sample_engines() if engines is None else engines
    # No time budget: the rows are fixed and few.
    sweep = SweepRunner(engines, RunSettings("cpu", policy, math.inf, seed), log)
    versions = {e.name: sweep.absent.get(e.name) or e.version() for e in engines}
    rows = []
    for row in selected_rows(quick) if rows_to_run is None else rows_to_run:
        result, examples = run_per_sample_row(row, sweep)
        rows.append({**result.to_dict(), "examples": examples})
        log(f"  {row.label()}: {_row_line(result)}")
    return {
        "name": PER_SAMPLE, "title": TITLE, "x_name": "row", "kind": PER_SAMPLE,
        "notes": [f"{e.name}: {e.describe()}" for e in engines], "rows": rows,
    }, versions


def format_per_sample(sweep: dict[str, Any]) -> str:
    """The sweep as a fixed-width table (:func:`bench.tables.per_sample_grid`) with the
    engines' calls and the status notes under it."""
    from bench.report import render_table

    notes = [*sweep["notes"], *problem_notes(sweep)]
    return "\n".join([f"== {PER_SAMPLE}: {sweep['title']} (median ms) ==",
                      *render_table(per_sample_grid(sweep)), *(f"   {n}" for n in notes)])


def list_rows() -> str:
    """The rows, for ``python -m bench.run --list``."""
    quick = "; ".join(r.label() for r in selected_rows(True))
    return (f"{PER_SAMPLE:15s} {TITLE}\n{'':15s} rows: "
            + "; ".join(r.label() for r in PER_SAMPLE_ROWS) + f"\n{'':15s} --quick: {quick}")
