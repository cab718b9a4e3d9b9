"""Running sweeps: per row, check every engine against the reference, then time them interleaved.

Per row:

1. build the inputs (float32, seeded from the row; :func:`bench.models.make_inputs`) and the
   float64 reference (:mod:`bench.reference`);
2. for each engine: prepare it (not timed), make the warm-up call (not timed; hod traces and
   generates code here) and compare its result with the reference block by block
   (:func:`bench.compare.compare_blocks`); a wrong result is reported as ``WRONG`` and the
   engine is not timed;
3. time the remaining engines in interleaved rounds (:func:`bench.timing.interleaved`).

The call that is checked is the first call of the very callable that is then timed.

A row whose reference cannot be computed or is degenerate (:mod:`bench.reference`) is timed,
but every engine's status there is ``unchecked``: tables mark it and leave it out of the ratios.

Time budget: an engine whose warm-up call or median call takes longer than ``budget_s`` is timed
with a single call on that row and ``SKIPPED`` on the following (larger) rows of the sweep.
"""

from __future__ import annotations

import gc
import time
import zlib
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field

from torch import Tensor

from bench.compare import compare_blocks
from bench.engines import Engine, Runner, failure_kind
from bench.models import Case, Sweep, make_inputs
from bench.reference import Reference, reference
from bench.timing import RepPolicy, interleaved, median_ms

# Engine statuses. Only OK and UNCHECKED results carry a median; tables use OK ones only.
OK = "ok"
UNCHECKED = "unchecked"
WRONG = "WRONG"
SKIPPED = "SKIPPED"
UNSUPPORTED = "n/a"
ABSENT = "absent"


@dataclass
class EngineResult:
    """What one engine did on one row.

    ``check_rel_err`` is the check's largest relative error over the blocks (None when the
    engine was not checked); ``check`` the check's line.
    """

    status: str
    median_ms: float | None = None
    min_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    warmup_ms: float | None = None
    detail: str = ""
    check_rel_err: float | None = None
    check: str = ""


@dataclass
class RowResult:
    """One row of a sweep: the case, its swept value and every engine's result."""

    case: Case
    x: int | str
    engines: dict[str, EngineResult]
    reference: str = ""
    seconds: float = 0.0  # wall time of the whole row: reference, checks, warm-ups, timing

    def to_dict(self) -> dict[str, object]:
        return {
            "x": self.x,
            "label": self.case.label(),
            "case": self.case.to_dict(),
            "reference": self.reference,
            "seconds": round(self.seconds, 2),
            "engines": {name: asdict(r) for name, r in self.engines.items()},
        }


@dataclass
class RunSettings:
    """Knobs shared by all rows."""

    device: str
    policy: RepPolicy
    budget_s: float
    seed: int = 0


def row_seed(case: Case, base: int) -> int:
    """A seed that depends on the row only, so reruns and subprocesses see the same inputs."""
    return (zlib.crc32(case.label().encode()) + base) % (2**31)


class SweepRunner:
    """Runs the rows of sweeps with a fixed list of engines."""

    def __init__(
        self,
        engines: list[Engine],
        settings: RunSettings,
        log: Callable[[str], None] = print,
    ) -> None:
        self.engines = engines
        self.settings = settings
        self.log = log
        self.absent = {e.name: reason for e in engines if (reason := e.unavailable_reason())}
        self.peers = {e.name: e.peer for e in engines}

    def run_sweep(
        self, sweep: Sweep, quick: bool, only: Collection[str] | None = None
    ) -> list[RowResult]:
        """Run the selected rows of ``sweep``, smallest first, applying the time budget, with
        every engine or those named in ``only``."""
        engines = [e for e in self.engines if only is None or e.name in only]
        over_budget: dict[str, str] = {}
        rows = []
        for case in sweep.selected(quick):
            row = self.run_row(case, sweep.x_value(case), over_budget, engines)
            rows.append(row)
            self.log(f"  {sweep.x_name}={row.x}: " + _row_line(row))
            for engine in engines:
                result = row.engines[engine.name]
                if engine.name not in over_budget and self._is_over_budget(engine, result):
                    over_budget[engine.name] = (
                        f"over the {self.settings.budget_s:g} s budget at {row.x}"
                    )
        return rows

    def _is_over_budget(self, engine: Engine, result: EngineResult) -> bool:
        limit_ms = 1e3 * self.settings.budget_s
        slow_warmup = (not engine.compiles_in_warmup and result.warmup_ms is not None
                       and result.warmup_ms > limit_ms)
        slow_call = result.median_ms is not None and result.median_ms > limit_ms
        return slow_warmup or slow_call

    def run_row(
        self, case: Case, x: int | str, over_budget: dict[str, str],
        engines: list[Engine] | None = None,
    ) -> RowResult:
        """Check and time ``engines`` (default: every engine) on one case."""
        start = time.perf_counter()
        settings = self.settings
        inputs = make_inputs(case, row_seed(case, settings.seed), settings.device)
        ref: Reference | None = None
        try:
            ref = reference(case, inputs)
            ref_note = ref.describe()
        except Exception as exc:  # the row is timed, unchecked
            ref_note = f"reference failed ({failure_kind(exc)}: {_short(exc)}); row unchecked"
        results: dict[str, EngineResult] = {}
        runners: dict[str, Runner] = {}
        for engine in self.engines if engines is None else engines:
            skip = self._skip_reason(engine, case, over_budget)
            if skip is not None:
                results[engine.name] = skip
                continue
            result, runner = self._warm_up(engine, case, inputs, ref)
            results[engine.name] = result
            if runner is not None:
                runners[engine.name] = runner
        del ref
        gc.collect()
        for name, why in hopeless_settings(results, self.peers).items():
            runners.pop(name).close()
            results[name].status, results[name].detail = SKIPPED, why
        self._time(runners, results)
        for runner in runners.values():
            runner.close()
        return RowResult(case, x, results, ref_note, time.perf_counter() - start)

    def _skip_reason(
        self, engine: Engine, case: Case, over_budget: dict[str, str]
    ) -> EngineResult | None:
        if engine.name in self.absent:
            return EngineResult(ABSENT, detail=self.absent[engine.name])
        if (reason := engine.unsupported_reason(case)) is not None:
            return EngineResult(UNSUPPORTED, detail=reason)
        if engine.name in over_budget:
            return EngineResult(SKIPPED, detail=over_budget[engine.name])
        return None

    def _warm_up(
        self, engine: Engine, case: Case, inputs: tuple[Tensor, ...], ref: Reference | None
    ) -> tuple[EngineResult, Runner | None]:
        """Prepare and warm up one engine and check its result; return its provisional result,
        and its runner if it is to be timed."""
        try:
            runner = engine.prepare(case, inputs, self.settings.device)
            warm = runner.warmup()
        except Exception as exc:
            return EngineResult(failure_kind(exc), detail=_short(exc)), None
        result = EngineResult(OK, warmup_ms=1e3 * warm.seconds)
        if ref is None:
            result.status, result.detail = UNCHECKED, "the row's reference failed"
            return result, runner
        check = compare_blocks(warm.blocks, ref.blocks)
        result.check_rel_err = check.max_rel_err
        result.check = result.detail = check.summary() + (f"; {warm.note}" if warm.note else "")
        if not check.ok:
            result.status = WRONG
            runner.close()
            return result, None
        return result, runner

    def _time(self, runners: dict[str, Runner], results: dict[str, EngineResult]) -> None:
        """Interleaved timing of the warmed-up engines; fills medians or failure statuses."""

        def on_error(name: str, exc: BaseException) -> None:
            results[name].status = failure_kind(exc)
            results[name].detail = _short(exc)

        caps = trailing_settings(results, self.peers, self.settings.policy.min_reps)
        caps.update({
            name: 1
            for name in runners
            if (results[name].warmup_ms or 0.0) > 1e3 * self.settings.budget_s
        })
        callers = {name: runner.time_call for name, runner in runners.items()}
        samples = interleaved(callers, self.settings.policy, caps, on_error)
        for name, times in samples.items():
            result = results[name]
            if result.status in (OK, UNCHECKED):
                result.times_ms = [1e3 * t for t in times]
                result.median_ms = median_ms(times)
                result.min_ms = min(result.times_ms, default=None)


#: A peer setting whose warm-up call takes over HOPELESS_MS and is HOPELESS times slower than
#: the fastest warm-up of another setting of the same peer on the row is not timed there (it
#: cannot be that peer's best). The floor keeps a noisy short warm-up from dropping a setting.
HOPELESS = 10.0
HOPELESS_MS = 100.0


#: A peer setting whose warm-up is TRAILING times the fastest warm-up of another setting of the
#: same peer is timed with the policy's minimum number of calls only (not for its target time).
TRAILING = 2.0


def _rival_warmups(
    results: dict[str, EngineResult], peers: dict[str, str]
) -> dict[str, tuple[float, str, float]]:
    """Per warmed-up engine with a rival (another setting of the same peer): its warm-up ms,
    and the fastest rival with its warm-up ms."""
    warm = {n: r.warmup_ms for n, r in results.items()
            if r.status in (OK, UNCHECKED) and r.warmup_ms is not None}
    out = {}
    for name, ms in warm.items():
        rivals = {o: t for o, t in warm.items() if o != name and peers[o] == peers[name]}
        if rivals:
            best = min(rivals, key=rivals.__getitem__)
            out[name] = (ms, best, rivals[best])
    return out


def trailing_settings(
    results: dict[str, EngineResult], peers: dict[str, str], min_reps: int
) -> dict[str, int]:
    """Sample caps (``min_reps``) for the settings :data:`TRAILING` behind a rival."""
    return {name: min_reps for name, (ms, _, rival_ms) in _rival_warmups(results, peers).items()
            if ms > TRAILING * rival_ms}


def hopeless_settings(results: dict[str, EngineResult], peers: dict[str, str]) -> dict[str, str]:
    """The warmed-up engines (name -> why) that :data:`HOPELESS` leaves untimed on this row.

    ``peers`` maps engine names to their peer; only settings of one peer are compared.
    """
    hopeless = {}
    for name, (ms, best, rival_ms) in _rival_warmups(results, peers).items():
        if ms > HOPELESS_MS and ms > HOPELESS * rival_ms:
            hopeless[name] = (f"not timed: warm-up {ms:.1f} ms, over {HOPELESS:g}x "
                              f"{best}'s {rival_ms:.1f} ms on this row")
    return hopeless


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _row_line(row: RowResult) -> str:
    parts = []
    for name, result in row.engines.items():
        if result.median_ms is not None:
            parts.append(f"{name} {result.median_ms:.3f} ms")
        else:
            parts.append(f"{name} {result.status}")
    return " | ".join(parts)
