"""The ``taylor`` sweep: Laplacians, a biharmonic, a stochastic Laplacian, an HVP and a PINN step
(:mod:`bench.taylor_rows`), timed for hod, jet-for-pytorch (collapsed and standard, in a worker
process under the Python 3.12 environment: :mod:`bench.jet_worker`) and nested torch.func, with
the matmul floor beside them. Run it with ``python -m bench.run --sweeps taylor``.

Per row, as for the other sweeps (:mod:`bench.runner`): the float64 reference, every engine's
first call checked against it (:func:`bench.compare.compare_blocks`; a wrong engine is not
timed), then interleaved timing (:func:`bench.timing.interleaved`). The floor is timed with the
others but has nothing to check (its status is ``unchecked``, its detail says why).
"""

from __future__ import annotations

import gc
import importlib
import math
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.compare import compare_blocks
from bench.engines import (
    THOAD_SETUP_HINT,
    CallableRunner,
    EngineFailure,
    Runner,
    ThoadWorker,
    Warmup,
    failure_kind,
    thoad_python,
)
from bench.runner import (
    OK,
    UNCHECKED,
    WRONG,
    EngineResult,
    RowResult,
    RunSettings,
    SweepRunner,
    _short,
    row_seed,
)
from bench.tables import FLOOR, TAYLOR, problem_notes, taylor_grid
from bench.taylor_rows import (
    TAYLOR_ROWS,
    Blocks,
    TaylorRow,
    as_blocks,
    floor_vectors,
    func_hvp,
    hessian_trace_biharmonic,
    hessian_trace_laplacian,
    hvp_hutchinson,
    hvp_loss,
    make_inputs,
    matmul_floor,
    mlp,
    pinn_blocks,
    pinn_loss,
    reference,
    tracked,
)
from bench.timing import RepPolicy, timed

TITLE = "Taylor mode: Laplacians, biharmonic, stochastic Laplacian, HVP, PINN step"


class ThunkRunner(CallableRunner):
    """Runs an in-process thunk on the CPU; its result is turned into Blocks by the row's kind
    (an empty Blocks for the floor's matmuls, which have nothing to check)."""

    def __init__(self, thunk: Callable[[], object], row: TaylorRow | None) -> None:
        super().__init__(thunk, row, "cpu")  # type: ignore[arg-type]

    def warmup(self) -> Warmup:
        out, seconds = timed(self._thunk, self._device)
        return Warmup(as_blocks(self._case, out) if self._case else {}, seconds)


class TaylorEngine(ABC):
    """A way of computing a taylor row (the counterpart of :class:`bench.engines.Engine`);
    ``directions``: which of :data:`bench.taylor_rows.DIRECTIONS` it draws on a stochastic row."""

    name: str
    peer: str
    setting: str = ""
    directions = "V"
    #: Whether the warm-up call compiles (then it says nothing of the calls after it).
    compiles_in_warmup = False

    def unavailable_reason(self) -> str | None:
        return None

    def unsupported_reason(self, row: TaylorRow) -> str | None:
        return None

    def version(self) -> str:
        return f"torch {torch.__version__}"

    @abstractmethod
    def describe(self) -> str:
        """The calls this engine times, for the result file."""

    @abstractmethod
    def prepare(self, row: TaylorRow, inputs: dict[str, Any]) -> Runner:
        """Build the row's callable (not timed)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release engine-wide resources (the worker process)."""


class HodTaylorEngine(TaylorEngine):
    """hod's Taylor-mode transforms (imported lazily: they may be missing)."""

    name = peer = "hod"
    API = ("laplacian", "biharmonic", "hvp")
    directions = "V_hod"
    options: dict[str, Any] = {}  # keywords of every hod transform

    def __init__(self) -> None:
        self._hod: Any = None
        self._error: str | None = None

    def unavailable_reason(self) -> str | None:
        if self._hod is None and self._error is None:
            try:
                module = importlib.import_module("hod")
                missing = [n for n in self.API if not callable(getattr(module, n, None))]
                if missing:
                    raise ImportError(f"hod has no {', '.join(missing)}")
                self._hod = module
            except Exception as exc:  # a work-in-progress hod must not stop the run
                self._error = f"cannot use hod: {type(exc).__name__}: {exc}"
        return self._error

    def version(self) -> str:
        return f"hod {getattr(self._hod, '__version__', '?')}" if self._hod else "not importable"

    def describe(self) -> str:
        return ("hod.laplacian(mlp) (samples=S, rademacher, on the stochastic row), "
                "hod.biharmonic(mlp), hod.hvp(loss); PINN: the loss of hod.laplacian's result "
                "and torch.autograd.grad to the parameters")

    def prepare(self, row: TaylorRow, inputs: dict[str, Any]) -> Runner:
        hod, X, params, options = self._hod, inputs["X"], inputs["params"], self.options
        if row.kind == "laplacian":
            lap = hod.laplacian(mlp, **options)
            return ThunkRunner(lambda: lap(X, *params), row)
        if row.kind == "biharmonic":
            bih = hod.biharmonic(mlp, **options)
            return ThunkRunner(lambda: bih(X, *params), row)
        if row.kind == "stochastic":
            generator = torch.Generator().manual_seed(int(inputs["direction_seed"]))
            est = hod.laplacian(mlp, samples=row.samples, distribution="rademacher",
                                generator=generator, **options)
            return ThunkRunner(lambda: est(X, *params), row)
        if row.kind == "hvp":
            hf = hod.hvp(hvp_loss(row.sizes), **options)
            primals = (inputs["theta"], X, inputs["Y"])
            return ThunkRunner(lambda: hf(primals, inputs["v"]), row)
        lap = hod.laplacian(mlp, **options)
        weights, s = tracked(params), inputs["s"]
        return ThunkRunner(lambda: pinn_blocks(pinn_loss(lap(X, *weights), s), weights), row)


class HodCompiledTaylorEngine(HodTaylorEngine):
    """The same with ``compile=True`` (torch.compile in the warm-up call)."""

    name = peer = "hod.compile"
    options = {"compile": True}
    compiles_in_warmup = True

    def describe(self) -> str:
        return "as hod, with compile=True"


class TorchFuncTaylorEngine(TaylorEngine):
    """Nested torch.func, as in jet-for-pytorch's paper benchmark."""

    name = peer = "torch.func"

    def describe(self) -> str:
        return ("vmap over data of trace(hessian(u)) (biharmonic: trace(hessian) of that); "
                "stochastic: vmap over data and directions of v . jvp(grad(u), x, v) with the "
                "row's directions; HVP: jvp(grad(loss)); PINN: + torch.autograd.grad")

    def prepare(self, row: TaylorRow, inputs: dict[str, Any]) -> Runner:
        X, params = inputs["X"], inputs["params"]
        thunks: dict[str, Callable[[], object]] = {
            "laplacian": lambda: hessian_trace_laplacian(X, params),
            "biharmonic": lambda: hessian_trace_biharmonic(X, params),
            "stochastic": lambda: hvp_hutchinson(X, inputs["V"], params),
            "hvp": lambda: func_hvp(row.sizes, inputs["theta"], X, inputs["Y"], inputs["v"]),
        }
        if row.kind == "pinn":
            weights, s = tracked(params), inputs["s"]
            return ThunkRunner(lambda: pinn_blocks(
                pinn_loss(hessian_trace_laplacian(X, weights), s), weights), row)
        return ThunkRunner(thunks[row.kind], row)


class FloorEngine(TaylorEngine):
    """The matmul floor of a forward Taylor method (:func:`bench.taylor_rows.floor_vectors`)."""

    name = peer = FLOOR

    def describe(self) -> str:
        return ("the weight matmuls only, of batch x n stacked vectors (n: D + 2 for a "
                "Laplacian, S + 2 stochastic, 2 + 3 D(D+1)/2 biharmonic; HVP 3 and PINN D + 2 "
                "with two backward matmuls per layer)")

    def prepare(self, row: TaylorRow, inputs: dict[str, Any]) -> Runner:
        return ThunkRunner(matmul_floor(row, list(inputs["params"][0::2])), None)


class JetWorker(ThoadWorker):
    """The jet-for-pytorch worker process (:mod:`bench.jet_worker`)."""

    module = "bench.jet_worker"
    label = "jet-for-pytorch"


class JetProcess:
    """One worker shared by the jet-for-pytorch settings, started on first use."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="hod-bench-jet-"))
        self.worker: JetWorker | None = None
        self.version = ""
        self.unavailable: str | None = None
        self._inputs_of: TaylorRow | None = None

    def check(self) -> str | None:
        """Why the worker cannot run (None when it runs)."""
        if self.worker is None and self.unavailable is None:
            python = thoad_python()
            if not python.exists():
                self.unavailable = (f"no Python 3.12 environment at {python}; "
                                    f"{THOAD_SETUP_HINT}")
            else:
                try:
                    self.start()
                except EngineFailure as exc:
                    self.unavailable = f"jet worker does not start: {exc}; {THOAD_SETUP_HINT}"
        return self.unavailable

    def start(self) -> None:
        if self.worker is not None and self.worker.alive():
            return
        if self.worker is not None:
            self.worker.close()
        self.worker = JetWorker(thoad_python(), self.workdir / "worker.log")
        self._inputs_of = None
        reply = self.worker.request({"cmd": "hello"}, timeout_s=180.0)
        self.version = (f"jet-for-pytorch {reply['jet']} (python {reply['python']}, "
                        f"torch {reply['torch']})")

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.start()
        assert self.worker is not None
        return self.worker.request(message, self.timeout_s)

    def inputs_path(self, row: TaylorRow, inputs: dict[str, Any]) -> Path:
        """The row's inputs saved for the worker (once per row)."""
        path = self.workdir / "inputs.pt"
        if self._inputs_of != row:
            torch.save(inputs, path)
            self._inputs_of = row
        return path

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class JetRunner(Runner):
    """Proxy for one setting set up in the jet worker."""

    def __init__(self, process: JetProcess, setting: str) -> None:
        self._process = process
        self._setting = setting

    def warmup(self) -> Warmup:
        path = self._process.workdir / f"result-{self._setting}.pt"
        reply = self._process.request(
            {"cmd": "warmup", "setting": self._setting, "result": str(path)})
        blocks = torch.load(path)
        path.unlink()
        return Warmup(blocks, reply["seconds"])

    def time_call(self) -> float:
        return self._process.request({"cmd": "time", "setting": self._setting})["seconds"]


class JetTaylorEngine(TaylorEngine):
    """jet-for-pytorch in one of the worker's settings (``collapsed``, ``standard``)."""

    peer = "jet"

    def __init__(self, setting: str, process: JetProcess) -> None:
        self.setting = setting
        self.name = f"jet[{setting}]"
        self._process = process
        self.compiles_in_warmup = setting.endswith("compile")

    def unavailable_reason(self) -> str | None:
        return self._process.check()

    def unsupported_reason(self, row: TaylorRow) -> str | None:
        if row.kind == "hvp":
            return "jet-for-pytorch has no Hessian-vector product"
        return None

    def version(self) -> str:
        return self._process.version or "not started"

    def describe(self) -> str:
        collapsed = self.setting != "standard"
        compiled = ", torch.compile" if self.setting.endswith("compile") else ""
        return (f"jet.laplacian / jet.bilaplacian(u, collapsed={collapsed}; "
                f"randomization=('rademacher', S) on the stochastic row), capture_graph, "
                f"common_subexpression_elimination, vmap over the data{compiled} (as the "
                f"paper's benchmark); PINN: + torch.autograd.grad")

    def prepare(self, row: TaylorRow, inputs: dict[str, Any]) -> Runner:
        path = self._process.inputs_path(row, inputs)
        self._process.request({"cmd": "setup", "setting": self.setting, "row": row.to_dict(),
                               "inputs": str(path), "threads": torch.get_num_threads()})
        return JetRunner(self._process, self.setting)

    def shutdown(self) -> None:
        self._process.close()


def make_taylor_engines(timeout_s: float, compiled: bool = False) -> list[TaylorEngine]:
    """hod, jet-for-pytorch's settings (one worker), torch.func and the floor; with
    ``compiled`` also hod.compile and jet[collapsed+compile]."""
    process = JetProcess(timeout_s)
    hods: list[TaylorEngine] = [HodTaylorEngine()]
    jets = ["collapsed", "standard"]
    if compiled:
        hods.append(HodCompiledTaylorEngine())
        jets.append("collapsed+compile")
    return [*hods, *(JetTaylorEngine(s, process) for s in jets), TorchFuncTaylorEngine(),
            FloorEngine()]


def _warm_up(engine: TaylorEngine, row: TaylorRow, inputs: dict[str, Any],
             refs: dict[str, Blocks]) -> tuple[EngineResult, Runner | None]:
    """Prepare, make the first call and check it; the result, and the runner if it is timed."""
    try:
        runner = engine.prepare(row, inputs)
        warm = runner.warmup()
    except Exception as exc:
        return EngineResult(failure_kind(exc), detail=_short(exc)), None
    result = EngineResult(OK, warmup_ms=1e3 * warm.seconds)
    if engine.name == FLOOR:
        n, backward = floor_vectors(row)
        result.status = UNCHECKED
        result.detail = (f"matmuls only ({row.batch} x {n} vectors"
                         f"{', with the backward' if backward else ''}): nothing to check")
        return result, runner
    check = compare_blocks(warm.blocks, refs[engine.directions if row.kind == "stochastic" else ""])
    result.check_rel_err = check.max_rel_err
    result.check = result.detail = check.summary()
    if not check.ok:
        result.status = WRONG
        runner.close()
        return result, None
    return result, runner


def run_taylor_row(row: TaylorRow, sweep: SweepRunner) -> RowResult:
    """Check and time ``sweep``'s engines on one row; the timing, and the peer settings far
    behind another setting of their peer, as :class:`bench.runner.SweepRunner` does them."""
    start = time.perf_counter()
    inputs = make_inputs(row, row_seed(row, sweep.settings.seed))
    refs = reference(row, inputs)
    results: dict[str, EngineResult] = {}
    runners: dict[str, Runner] = {}
    for engine in sweep.engines:
        if (skip := sweep._skip_reason(engine, row, over_budget={})) is not None:
            results[engine.name] = skip  # absent, or n/a on this row
            continue
        results[engine.name], runner = _warm_up(engine, row, inputs, refs)
        if runner is not None:
            runners[engine.name] = runner
    del refs
    gc.collect()
    sweep._drop_hopeless(runners, results)
    sweep._time(runners, results)
    for runner in runners.values():
        runner.close()
    return RowResult(row, row.label(), results, "nested torch.func in float64",
                     time.perf_counter() - start)


def run_taylor_sweep(
    policy: RepPolicy, seed: int = 0, timeout_s: float = 600.0,
    log: Callable[[str], None] = print, rows_to_run: tuple[TaylorRow, ...] = TAYLOR_ROWS,
    engines: list[TaylorEngine] | None = None, compiled: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The taylor rows (default: every one) with ``engines`` (default:
    :func:`make_taylor_engines`, ``compiled`` passed on); returns the sweep in the result
    file's form and the engines' versions (or why each is absent)."""
    engines = make_taylor_engines(timeout_s, compiled) if engines is None else engines
    rows: list[RowResult] = []
    try:
        # No time budget: the rows are fixed, and a compiling warm-up says nothing of the calls.
        sweep = SweepRunner(engines, RunSettings("cpu", policy, math.inf, seed), log)
        # Settings are only rivals at warm-up (the hopeless and trailing rules) when both
        # compile or neither does.
        sweep.peers = {e.name: e.peer + " compiled" * e.compiles_in_warmup for e in engines}
        versions = {e.name: sweep.absent.get(e.name) or e.version() for e in engines}
        for row in rows_to_run:
            result = run_taylor_row(row, sweep)
            rows.append(result)
            log(f"  {row.label()}: " + " | ".join(
                f"{n} {r.median_ms:.2f} ms" if r.median_ms is not None else f"{n} {r.status}"
                for n, r in result.engines.items()))
    finally:
        for engine in engines:
            engine.shutdown()
    sweep = {
        "name": TAYLOR, "title": TITLE, "x_name": "row", "kind": TAYLOR,
        "notes": [f"{e.name}: {e.describe()}" for e in engines],
        "rows": [r.to_dict() for r in rows],
    }
    return sweep, versions


def format_taylor(sweep: dict[str, Any]) -> str:
    """The taylor sweep as a fixed-width table (:func:`bench.tables.taylor_grid`), the engines'
    calls and the status notes under it."""
    from bench.report import render_table

    out = [f"== {TAYLOR}: {sweep['title']} (median ms) =="]
    out += render_table(taylor_grid(sweep))
    out += [f"   {n}" for n in [*sweep["notes"], *problem_notes(sweep)]]
    return "\n".join(out)


def list_rows() -> str:
    """The taylor rows, for ``python -m bench.run --list``."""
    return f"{TAYLOR:15s} {TITLE}\n{'':15s} rows: " + ", ".join(r.label() for r in TAYLOR_ROWS)
