"""The ``zoo`` sweep: Hessians of real models in float32 (:mod:`bench.zoo_rows`), hod against the
best of torch.func, torch.autograd.functional and thoad. Run it with
``python -m bench.run --sweeps zoo``.

Engines, on every row (``f`` and ``x`` of :class:`~bench.zoo_rows.Problem`; on the PINN row,
order 3 per point of the batch ``X``):

* ``hod``: ``hod.hessian(f)(x)``; PINN: ``vmap(hod.derivative(u, 3))(X)``;
* ``torch.func[fwd-rev]``: ``torch.func.hessian(f)(x)``; PINN:
  ``vmap(jacfwd(jacfwd(jacrev(u))))``;
* ``torch.func[rev]``: ``jacrev(jacrev(f))(x)``; PINN: ``vmap(jacrev(jacrev(jacrev(u))))``;
* ``autograd.functional[seed]`` / ``[vectorize]``: ``torch.autograd.functional.hessian(f, x)``
  without / with ``vectorize=True``; PINN (no vmap): ``jacobian`` nested three times with
  ``create_graph=True``, each level differentiating the sum over the points of the level below
  (the points are independent, so that sum's derivative holds every point's own), then the
  axes permuted to ``(points, 2, 2, 2)``;
* ``thoad``: ``thoad.backward(tensor=f(x), order=2, keep_batch=True)`` then ``ctrl.clear()``,
  in a Python 3.12 worker (``python -m bench.zoo``, this module's :func:`main`, which builds
  the row from its seed; its address space capped at :data:`WORKER_ADDRESS_SPACE`); PINN:
  ``tensor=u(X)`` of shape ``(points,)``, order 3, the per-point tensor read from
  ``fetch_hgrad(keep_batch=True)``'s diagonal. Where thoad raises that an operation "is not
  supported", the row says ``n/a`` with thoad's message.

Per row, as in the other sweeps (:mod:`bench.runner`): the float64 reference (torch.func on the
same weights and inputs cast to float64), every engine's first call checked against it
(:func:`bench.compare.compare_blocks`; a wrong engine is not timed), then interleaved timing
(:func:`bench.timing.interleaved`), medians in the result file. A peer setting far behind
another setting of the same peer is not timed (:data:`bench.runner.HOPELESS`).
"""

from __future__ import annotations

import resource
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from bench.compare import reference_scale
from bench.engines import (
    AUTOGRAD_FUNCTIONAL_SETTINGS,
    AutogradFunctionalEngine,
    CallableRunner,
    Engine,
    HodEngine,
    Runner,
    ThoadEngine,
    ThoadRunner,
    ThoadWorker,
    TorchFuncEngine,
    Warmup,
    failure_kind,
    serve_stdio,
    thoad_python,
    torch_func_derivative,
)
from bench.per_sample import hod_transform
from bench.reference import Reference
from bench.runner import (
    UNSUPPORTED,
    EngineResult,
    RowResult,
    RunSettings,
    SweepRunner,
    _row_line,
    _short,
    row_seed,
)
from bench.tables import ZOO, sweep_tables
from bench.thoad_worker import ThoadCase
from bench.thoad_worker import _handle as thoad_handle
from bench.timing import RepPolicy
from bench.zoo_rows import ATTENTION, ZOO_ROWS, Problem, ZooRow, make_problem

TITLE = "real models in float32: hod vs the best of torch.func, autograd.functional and thoad"
#: Seconds per call above which an engine is timed with one call on the row (not skipped).
BUDGET_S = 20.0


class ZooEngine(Engine):
    """An in-process engine: ``derivative(f, order)`` of the row's function, mapped over the
    points with ``vmap`` on a per-point row."""

    @abstractmethod
    def derivative(self, f: Callable[[Tensor], Tensor], order: int) -> Callable:
        """The engine's order-``order`` derivative of ``f`` (a function of ``f``'s argument)."""

    def prepare(self, row: ZooRow, problem: Problem, device: str) -> Runner:
        fn = self.derivative(problem.f, row.order)
        if problem.per_point:
            fn = vmap(fn)
        return CallableRunner(lambda: fn(problem.x), row, device)


class ZooHodEngine(ZooEngine, HodEngine):
    """``hod.hessian(f)``; ``hod.derivative(u, 3)`` at order 3."""

    def describe(self) -> str:
        return "hod.hessian(f)(x); PINN: vmap(hod.derivative(u, 3))(X)"

    def derivative(self, f: Callable[[Tensor], Tensor], order: int) -> Callable:
        return hod_transform(self._module, f, order)


#: What torch.func's settings (:data:`~bench.engines.TORCH_FUNC_SETTINGS`) call on these rows.
ZOO_TORCH_FUNC = {
    "fwd-rev": "torch.func.hessian(f)(x); PINN: vmap(jacfwd(jacfwd(jacrev(u))))(X)",
    "rev": "jacrev(jacrev(f))(x); PINN: vmap(jacrev(jacrev(jacrev(u))))(X)",
}


class ZooTorchFuncEngine(ZooEngine, TorchFuncEngine):
    """torch.func, nested as one of :data:`ZOO_TORCH_FUNC`."""

    def describe(self) -> str:
        return ZOO_TORCH_FUNC[self.setting]

    def derivative(self, f: Callable[[Tensor], Tensor], order: int) -> Callable:
        return torch_func_derivative(f, order, 0, self.setting)


def per_point_third(f: Callable[[Tensor], Tensor], X: Tensor, vectorize: bool) -> Tensor:
    """Every point's third derivative tensor ``(points, d, d, d)`` of ``f: (..., d) -> (...)`` at
    the rows of ``X`` with ``torch.autograd.functional.jacobian`` (module docstring)."""
    jacobian = torch.autograd.functional.jacobian

    def gradients(X: Tensor) -> Tensor:  # (points, d)
        return jacobian(lambda X: f(X).sum(), X, create_graph=True, vectorize=vectorize)

    def hessian_rows(X: Tensor) -> Tensor:  # (d, points, d): [i, b, j] = H_b[i, j]
        return jacobian(lambda X: gradients(X).sum(0), X, create_graph=True, vectorize=vectorize)

    third = jacobian(lambda X: hessian_rows(X).sum(1), X, vectorize=vectorize)
    return third.permute(2, 0, 1, 3)


class ZooAutogradEngine(AutogradFunctionalEngine):
    """``torch.autograd.functional.hessian(f, x)``: ``seed`` plain (as the seed notebook calls
    it), ``vectorize`` with ``vectorize=True``."""

    def _vectorize(self) -> bool:
        return bool(AUTOGRAD_FUNCTIONAL_SETTINGS[self.setting][0].get("vectorize", False))

    def unsupported_reason(self, row: ZooRow) -> str | None:
        return None  # order 3 (the PINN row) through nested jacobian calls

    def describe(self) -> str:
        vectorize = self._vectorize()
        return (f"torch.autograd.functional.hessian(f, x, vectorize={vectorize}); PINN: "
                f"jacobian(..., vectorize={vectorize}) nested three times on sums over the "
                "points, create_graph=True")

    def prepare(self, row: ZooRow, problem: Problem, device: str) -> Runner:
        f, x, vectorize = problem.f, problem.x, self._vectorize()
        if problem.per_point:
            return CallableRunner(lambda: per_point_third(f, x, vectorize), row, device)
        hessian = torch.autograd.functional.hessian
        return CallableRunner(lambda: hessian(f, x, vectorize=vectorize), row, device)


class ZooThoadWorker(ThoadWorker):
    """The thoad worker process of the zoo rows (this module's :func:`main`)."""

    module = "bench.zoo"


class ZooThoadEngine(ThoadEngine):
    """thoad in :class:`ZooThoadWorker`, which builds each row from its seed."""

    def describe(self) -> str:
        return ("thoad.backward(tensor=f(x), order=2, keep_batch=True), ctrl.clear(); PINN: "
                "tensor=u(X) (points,), order 3, each point's block read from "
                "fetch_hgrad(keep_batch=True)'s diagonal; in a Python 3.12 worker whose address "
                f"space is capped at {WORKER_ADDRESS_SPACE / 2**30:g} GiB")

    def _ensure_worker(self) -> str:
        if not isinstance(self._worker, ZooThoadWorker) or not self._worker.alive():
            if self._worker is not None:
                self._worker.close()
            self._worker = ZooThoadWorker(thoad_python(), self._workdir / "worker.log")
            reply = self._worker.request({"cmd": "hello"}, timeout_s=180.0)
            self._version = (f"thoad {reply['thoad']} (python {reply['python']}, "
                             f"torch {reply['torch']})")
        return self._version

    def prepare(self, row: ZooRow, problem: Problem, device: str) -> Runner:
        self._ensure_worker()
        assert self._worker is not None
        self._worker.request({"cmd": "setup", "row": row.to_dict(), "seed": problem.seed,
                              "threads": torch.get_num_threads()}, self.timeout_s)
        return ZooThoadRunner(self._worker, self._workdir, self.timeout_s, problem.per_point)


class ZooThoadRunner(ThoadRunner):
    """:class:`~bench.engines.ThoadRunner`, whose note says how a per-point row's blocks were
    read."""

    def __init__(self, worker: ThoadWorker, workdir: Path, timeout_s: float,
                 per_point: bool) -> None:
        super().__init__(worker, workdir, timeout_s)
        self._per_point = per_point

    def warmup(self) -> Warmup:
        warm = super().warmup()
        if self._per_point:
            warm.note = "per point: the diagonal of fetch_hgrad(keep_batch=True)'s block"
        return warm


def make_zoo_engines(thoad_timeout_s: float = 600.0) -> list[Engine]:
    """hod, torch.func's two nestings, autograd.functional plain (``seed``) and vectorized,
    thoad."""
    return [ZooHodEngine(), *(ZooTorchFuncEngine(s) for s in ZOO_TORCH_FUNC),
            *(ZooAutogradEngine(s) for s in ("seed", "vectorize")),
            ZooThoadEngine(timeout_s=thoad_timeout_s)]


def reference(row: ZooRow, seed: int) -> Reference:
    """torch.func (``torch.func.hessian``; order 3: ``jacfwd(jacfwd(jacrev))`` under vmap) on
    the row's problem in float64."""
    problem = make_problem(row, seed, torch.float64)
    fn = torch_func_derivative(problem.f, row.order, 0)
    result = (vmap(fn) if problem.per_point else fn)(problem.x)
    blocks = {(0,) * row.order: result.detach()}
    scale = reference_scale(blocks)
    return Reference(blocks, scale, scale)


def reference_note(row: ZooRow) -> str:
    attention = ("; attention in sdpa_kernel(SDPBackend.MATH), as for every engine"
                 if row.model in ATTENTION else "")
    return f"torch.func in float64 on the same weights and inputs{attention}"


def not_supported_by_thoad(engine: Engine, result: EngineResult) -> bool:
    """Whether thoad failed because it has no rule for an operation of the model."""
    return isinstance(engine, ThoadEngine) and "is not supported" in result.detail


def run_zoo_row(row: ZooRow, sweep: SweepRunner) -> RowResult:
    """Check and time ``sweep``'s engines on one row."""
    start = time.perf_counter()
    seed = row_seed(row, sweep.settings.seed)
    problem = make_problem(row, seed)
    results: dict[str, EngineResult] = {}
    runners: dict[str, Runner] = {}
    try:
        ref: Reference | None = reference(row, seed)
        note = reference_note(row)
    except Exception as exc:  # timed, unchecked
        ref, note = None, f"reference failed ({failure_kind(exc)}: {_short(exc)}); unchecked"
    for engine in sweep.engines:
        skipped = sweep._skip_reason(engine, row, over_budget={})
        if skipped is not None:
            results[engine.name] = skipped
            continue
        results[engine.name], runner = sweep._warm_up(engine, row, problem, ref)
        if not_supported_by_thoad(engine, results[engine.name]):
            results[engine.name].status = UNSUPPORTED
        if runner is not None:
            runners[engine.name] = runner
    del ref
    sweep._drop_hopeless(runners, results)
    sweep._time(runners, results)
    for runner in runners.values():
        runner.close()
    return RowResult(row, row.label(), results, note, time.perf_counter() - start)


def selected_rows(quick: bool) -> list[ZooRow]:
    """Every row, at its ``--quick`` sizes when ``quick``."""
    return [r.quick() for r in ZOO_ROWS] if quick else list(ZOO_ROWS)


def run_zoo_sweep(
    policy: RepPolicy, seed: int = 0, quick: bool = False, log: Callable[[str], None] = print,
    engines: list[Engine] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The rows (:func:`selected_rows`) with ``engines`` (default :func:`make_zoo_engines`);
    the sweep in the result file's form, and the engines' versions (or why each is absent)."""
    engines = make_zoo_engines() if engines is None else engines
    sweep = SweepRunner(engines, RunSettings("cpu", policy, BUDGET_S, seed), log)
    versions = {e.name: sweep.absent.get(e.name) or e.version() for e in engines}
    rows = []
    try:
        for row in selected_rows(quick):
            result = run_zoo_row(row, sweep)
            rows.append(result.to_dict())
            log(f"  {row.label()}: {_row_line(result)}")
    finally:
        for engine in engines:
            engine.shutdown()
    return {
        "name": ZOO, "title": TITLE, "x_name": "row", "kind": ZOO,
        "notes": [f"{e.name}: {e.describe()}" for e in engines], "rows": rows,
    }, versions


def format_zoo(sweep: dict[str, Any]) -> str:
    """The sweep's table (:func:`bench.tables.zoo_grid`) with the engines' calls and the status
    notes under it, in Markdown (as the benchmarks page shows it)."""
    return sweep_tables({"sweeps": [sweep]})


def list_rows() -> str:
    """The rows, one a line with its ``--quick`` form, for ``python -m bench.run --list``."""
    return "\n".join([f"{ZOO:15s} {TITLE}", *(f"{'':15s} {r.label()} (--quick: "
                                                f"{r.quick().label()})" for r in ZOO_ROWS)])


# --- the thoad worker (Python 3.12) ----------------------------------------------------------

class ThoadView:
    """A zoo problem seen as :class:`bench.thoad_worker.ThoadCase` reads a case: one input, no
    parameters, ``forward`` the row's function."""

    param_grad = False
    n_inputs = 1

    def __init__(self, f: Callable[[Tensor], Tensor], order: int) -> None:
        self._f = f
        self.order = order

    def forward(self, device: str) -> Callable[[Tensor], Tensor]:
        return self._f


class PerPointThoadCase(ThoadCase):
    """thoad on ``u(X)`` of shape ``(points,)``: the first call's per-point tensor is the
    diagonal of the compact block of ``fetch_hgrad(keep_batch=True)``."""

    def warmup(self, result_path: str) -> float:
        start = time.perf_counter()
        ctrl = self._backward()
        seconds = time.perf_counter() - start
        X = self.inputs[0]
        block, _ = ctrl.fetch_hgrad(variables=(X,) * self.case.order, keep_batch=True)
        # (output, point, 1, d, d, d) as thoad 0.4 lays it out; a point's own tensor sits where
        # the output is the point's.
        per_point = torch.diagonal(block, 0, 0, 1).movedim(-1, 0).reshape(
            X.shape[0], *(X.shape[1],) * self.case.order)
        ctrl.clear()
        torch.save({(0,) * self.case.order: per_point.detach()}, result_path)
        return seconds


def _handle(request: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The zoo's ``setup`` (``row``, ``seed``, ``threads``); everything else as the thoad
    worker answers it."""
    if request["cmd"] != "setup":
        return thoad_handle(request, state)
    state.pop("case", None)
    torch.set_num_threads(request["threads"])
    row = ZooRow.from_dict(request["row"])
    problem = make_problem(row, request["seed"])
    kind = PerPointThoadCase if problem.per_point else ThoadCase
    state["case"] = kind(ThoadView(problem.f, row.order), (problem.x,), "cpu")  # type: ignore[arg-type]
    return {}


#: The thoad worker's address space (its interpreter and torch take about 3 GiB of it): on the
#: PINN row at 256 points thoad's order-3 call grew to the machine's whole memory (23 GB)
#: until the kernel killed it; with the limit it fails as out of memory, and nothing else is
#: at risk.
WORKER_ADDRESS_SPACE = 8 * 2**30


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_ADDRESS_SPACE, WORKER_ADDRESS_SPACE))
    state: dict[str, Any] = {}
    serve_stdio(lambda request: _handle(request, state))


if __name__ == "__main__":
    main()
