"""The engines being compared, behind one small interface.

An :class:`Engine` turns a case and its inputs into a :class:`Runner`, whose ``warmup`` makes
the first (untimed, checked) call and returns the result as :data:`~bench.compare.Blocks`, and
whose ``time_call`` makes one timed call. Engines:

* ``hod``: ``hod.derivative(f, order, argnums)``, built once per row outside the timed region.
* ``hod.compile``: the same with ``compile=True`` (not run unless named in ``--engines``).
* ``torch.func[fwd-rev]``: ``jacrev(f, argnums)`` (order 1), ``torch.func.hessian`` (order 2),
  and ``jacrev`` inside ``order - 1`` ``jacfwd`` beyond; ``torch.func[rev]``: ``jacrev`` nested
  ``order`` times (orders 2, 3); ``torch.func[fwd]``: ``jacfwd`` (order 1).
* ``autograd.functional[seed]``: ``torch.autograd.functional.jacobian`` / ``hessian`` called
  exactly as in the seed notebook (orders 1 and 2 only); ``[vectorize]`` adds
  ``vectorize=True``, ``[vectorize-fwd]`` (Hessians) also ``outer_jacobian_strategy=
  "forward-mode"``.
* ``thoad``: ``thoad.backward(tensor=f(...), order=n, crossings=param_grad, keep_batch=True)``
  then ``ctrl.clear()``, as in the seed; it runs under Python >= 3.12 in a worker process
  (:mod:`bench.thoad_worker`), which times its own calls.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from bench.compare import Blocks, StructureError, flatten_nested
from bench.models import Case, Forward
from bench.tables import peer_of
from bench.timing import timed

REPO_ROOT = Path(__file__).resolve().parent.parent


class EngineFailure(RuntimeError):
    """An engine call failed; ``kind`` is ``"OOM"``, ``"TIMEOUT"`` or ``"ERROR"``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def serve(
    requests: TextIO, replies: TextIO, handle: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """Answer JSON-line requests with ``handle`` until ``quit`` or end of input; an exception
    becomes an error reply."""
    for line in requests:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **handle(request)}
        except Exception as exc:  # reported to the harness, which decides what to do
            reply = {"ok": False, "kind": "OOM" if is_out_of_memory(exc) else "ERROR",
                     "error": f"{type(exc).__name__}: {exc}"[:500]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def serve_stdio(handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """:func:`serve` a worker's stdin; replies go to its stdout, and whatever the peer
    library or torch prints goes to stderr, keeping the protocol channel clean."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, replies, handle)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is an allocation failure (CUDA's, or the CPU allocator's)."""
    text = str(exc)
    return (
        isinstance(exc, MemoryError | torch.OutOfMemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def failure_kind(exc: BaseException) -> str:
    """Classify an exception raised by an engine call (a misshapen result counts as WRONG)."""
    if isinstance(exc, EngineFailure):
        return exc.kind
    if isinstance(exc, StructureError):
        return "WRONG"
    return "OOM" if is_out_of_memory(exc) else "ERROR"


@dataclass
class Warmup:
    """The first call of a runner: its result blocks and duration; ``note`` says what the blocks
    are when that is not plain."""

    blocks: Blocks
    seconds: float
    note: str = ""


class Runner(ABC):
    """An engine prepared for one case and one set of inputs."""

    @abstractmethod
    def warmup(self) -> Warmup:
        """First call (tracing, code generation and the like happen here): result and time."""

    @abstractmethod
    def time_call(self) -> float:
        """One timed call, in seconds."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the runner holds."""


class Engine(ABC):
    """A way of computing the order-n derivative of a case's model.

    ``name`` is what tables and ``--engines`` use: the peer's name, with the setting in brackets
    for a peer timed with several settings (``torch.func[rev]``); ``peer`` is the name without
    it. Tables compare hod with the best setting of each peer.
    """

    name: str
    peer: str
    setting: str = ""
    #: Whether the warm-up call compiles (its time then says nothing of the calls after it,
    #: so the time budget looks at the timed calls only).
    compiles_in_warmup: bool = False

    def unavailable_reason(self) -> str | None:
        """Why this engine cannot run at all in this environment (None if it can)."""
        return None

    def unsupported_reason(self, case: Case) -> str | None:
        """Why this engine does not handle ``case`` (None if it does)."""
        return None

    def version(self) -> str:
        """What runs behind this engine, for the result file (call after unavailable_reason)."""
        return f"torch {torch.__version__}"

    def describe(self) -> str:
        """The call this engine times, for the result file and the tables' notes."""
        return self.name

    @abstractmethod
    def prepare(self, case: Case, inputs: tuple[Tensor, ...], device: str) -> Runner:
        """Build the callable for ``case`` on ``inputs`` (not timed)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release engine-wide resources (worker processes)."""


class CallableRunner(Runner):
    """Runs an in-process thunk whose result has torch.func's nested layout."""

    def __init__(self, thunk: Callable[[], object], case: Case, device: str) -> None:
        self._thunk = thunk
        self._case = case
        self._device = device

    def warmup(self) -> Warmup:
        out, seconds = timed(self._thunk, self._device)
        return Warmup(flatten_nested(out, self._case.order, self._case.argnums), seconds)

    def time_call(self) -> float:
        return timed(self._thunk, self._device)[1]


#: torch.func's settings: how ``jacrev`` and ``jacfwd`` are nested, and the orders they apply to.
TORCH_FUNC_SETTINGS: dict[str, tuple[str, tuple[int, ...]]] = {
    "fwd-rev": ("jacrev (order 1), torch.func.hessian = jacfwd(jacrev) (order 2), jacrev inside "
                "order-1 jacfwd (orders 3, 4)", (1, 2, 3, 4)),
    # Order 4 left out: jacrev nested 4 times took 3.7 s a call on the smallest order-4 row
    # without the weights (60x the fwd-rev nesting) and over 8 GB with them.
    "rev": ("jacrev nested order times: jacrev(jacrev(f)) for Hessians", (2, 3)),
    "fwd": ("jacfwd (order 1)", (1,)),
}


def torch_func_derivative(
    f: Forward, order: int, argnums: int | tuple[int, ...], setting: str = "fwd-rev"
) -> Callable:
    """torch.func's order-n derivative in one of :data:`TORCH_FUNC_SETTINGS`."""
    if setting == "fwd":
        return torch.func.jacfwd(f, argnums)
    if setting == "rev":
        fn = f
        for _ in range(order):
            fn = torch.func.jacrev(fn, argnums)
        return fn
    if order == 2:
        return torch.func.hessian(f, argnums)
    fn = torch.func.jacrev(f, argnums)
    for _ in range(order - 1):
        fn = torch.func.jacfwd(fn, argnums)
    return fn


def _setting_unsupported(orders: tuple[int, ...], case: Case) -> str | None:
    if case.order in orders:
        return None
    if len(orders) == 1:
        return f"order {orders[0]} only"
    return f"orders {', '.join(map(str, orders[:-1]))} and {orders[-1]} only"


class TorchFuncEngine(Engine):
    """torch.func's composable transforms, nested as one of :data:`TORCH_FUNC_SETTINGS`."""

    peer = "torch.func"

    def __init__(self, setting: str) -> None:
        self.setting = setting
        self.name = f"{self.peer}[{setting}]"

    def describe(self) -> str:
        return TORCH_FUNC_SETTINGS[self.setting][0]

    def unsupported_reason(self, case: Case) -> str | None:
        return _setting_unsupported(TORCH_FUNC_SETTINGS[self.setting][1], case)

    def prepare(self, case: Case, inputs: tuple[Tensor, ...], device: str) -> Runner:
        fn = torch_func_derivative(case.forward(device), case.order, case.argnums, self.setting)
        return CallableRunner(lambda: fn(*inputs), case, device)


#: torch.autograd.functional's settings: keywords of jacobian / hessian, and their orders.
AUTOGRAD_FUNCTIONAL_SETTINGS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "seed": ({}, (1, 2)),
    "vectorize": ({"vectorize": True}, (1, 2)),
    "vectorize-fwd": ({"vectorize": True, "outer_jacobian_strategy": "forward-mode"}, (2,)),
}


class AutogradFunctionalEngine(Engine):
    """``torch.autograd.functional.jacobian`` / ``hessian``, called as the seed calls them, with
    the keywords of one of :data:`AUTOGRAD_FUNCTIONAL_SETTINGS` (``seed``: none)."""

    peer = "autograd.functional"

    def __init__(self, setting: str) -> None:
        self.setting = setting
        self.name = f"{self.peer}[{setting}]"

    def describe(self) -> str:
        keywords = AUTOGRAD_FUNCTIONAL_SETTINGS[self.setting][0]
        args = "".join(f", {k}={v!r}" for k, v in keywords.items())
        return f"jacobian / hessian(func, inputs{args})"

    def unsupported_reason(self, case: Case) -> str | None:
        return _setting_unsupported(AUTOGRAD_FUNCTIONAL_SETTINGS[self.setting][1], case)

    def prepare(self, case: Case, inputs: tuple[Tensor, ...], device: str) -> Runner:
        functional = torch.autograd.functional
        api = functional.jacobian if case.order == 1 else functional.hessian
        keywords = AUTOGRAD_FUNCTIONAL_SETTINGS[self.setting][0]
        X, *params = inputs
        forward = case.forward(device)
        if case.param_grad:
            def thunk() -> object:
                return api(func=forward, inputs=(X, *params), **keywords)
        else:
            def fixed_forward(X: Tensor) -> Tensor:
                return forward(X, *params)

            def thunk() -> object:
                return api(func=fixed_forward, inputs=X, **keywords)
        return CallableRunner(thunk, case, device)


class HodEngine(Engine):
    """``hod.derivative`` (imported lazily: hod may be missing or incomplete)."""

    name = peer = "hod"
    options: dict[str, Any] = {}  # keywords of hod.derivative

    def __init__(self) -> None:
        self._module: Any = None
        self._import_error: str | None = None

    def unavailable_reason(self) -> str | None:
        if self._module is None and self._import_error is None:
            try:
                module = importlib.import_module("hod")
                if not callable(getattr(module, "derivative", None)):
                    raise ImportError("hod has no callable 'derivative'")
                self._module = module
            except Exception as exc:  # a broken work-in-progress hod must not stop the run
                self._import_error = f"cannot import hod: {type(exc).__name__}: {exc}"
        return self._import_error

    def version(self) -> str:
        if self._module is None:
            return "not importable"
        return f"hod {getattr(self._module, '__version__', '?')} from {self._module.__file__}"

    def prepare(self, case: Case, inputs: tuple[Tensor, ...], device: str) -> Runner:
        fn = self._module.derivative(
            case.forward(device), case.order, argnums=case.argnums, **self.options
        )
        return CallableRunner(lambda: fn(*inputs), case, device)


class HodCompiledEngine(HodEngine):
    """``hod.derivative(..., compile=True)``: the generated code through torch.compile
    (compiled during the warm-up call, which the timings leave out)."""

    name = peer = "hod.compile"
    options = {"compile": True}
    compiles_in_warmup = True


def thoad_python() -> Path:
    """Interpreter of the thoad environment: $THOAD_PYTHON, else <repo>/.venv312/bin/python."""
    return Path(os.environ.get("THOAD_PYTHON", REPO_ROOT / ".venv312" / "bin" / "python"))


THOAD_SETUP_HINT = "create it with: bash bench/setup_thoad_env.sh (or set THOAD_PYTHON)"


class ThoadWorker:
    """A long-lived ``python -m bench.thoad_worker`` process spoken to in JSON lines.

    The worker's stderr goes to ``log_path``; its last lines are quoted when it fails. A
    subclass names another worker module (``module``) and what its messages call it (``label``).
    """

    module = "bench.thoad_worker"
    label = "thoad"

    def __init__(self, python: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [str(python), "-m", self.module],
            cwd=REPO_ROOT,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )

    def alive(self) -> bool:
        return self._proc.poll() is None

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one request and wait for its reply; kills the worker on timeout."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError as exc:
            raise EngineFailure("ERROR", f"{self.label} worker died: {self.log_tail()}") from exc
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            self.close()
            raise EngineFailure(
                "TIMEOUT", f"{self.label} worker gave no answer in {timeout_s:.0f} s"
            )
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise EngineFailure(
                "ERROR", f"{self.label} worker exited ({self._proc.returncode}): {self.log_tail()}"
            )
        reply = json.loads(line)
        if not reply.get("ok"):
            raise EngineFailure(reply.get("kind", "ERROR"), reply.get("error", "unknown error"))
        return reply

    def log_tail(self, lines: int = 3) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def close(self) -> None:
        if self.alive():
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()


class ThoadRunner(Runner):
    """Proxy for one case set up in the thoad worker."""

    def __init__(self, worker: ThoadWorker, workdir: Path, timeout_s: float) -> None:
        self._worker = worker
        self._workdir = workdir
        self._timeout_s = timeout_s

    def warmup(self) -> Warmup:
        result_path = self._workdir / "thoad_result.pt"
        reply = self._worker.request(
            {"cmd": "warmup", "result": str(result_path)}, self._timeout_s
        )
        blocks = torch.load(result_path)
        result_path.unlink()
        note = (
            "thoad's compact blocks of backward(keep_batch=True) expanded by "
            "ctrl.fetch_hgrad(variables, keep_batch=False), size-1 output axis dropped"
        )
        return Warmup(blocks, reply["seconds"], note=note)

    def time_call(self) -> float:
        return self._worker.request({"cmd": "time"}, self._timeout_s)["seconds"]


class ThoadEngine(Engine):
    """thoad, run in a Python 3.12 worker process (see :mod:`bench.thoad_worker`)."""

    name = peer = "thoad"

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self._worker: ThoadWorker | None = None
        self._unavailable: str | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="hod-bench-thoad-"))
        self._version = ""

    def unavailable_reason(self) -> str | None:
        if self._unavailable is None and self._worker is None:
            python = thoad_python()
            if not python.exists():
                self._unavailable = f"no thoad environment at {python}; {THOAD_SETUP_HINT}"
            else:
                try:
                    self._version = self._ensure_worker()
                except EngineFailure as exc:
                    self._unavailable = f"thoad worker does not start: {exc}; {THOAD_SETUP_HINT}"
        return self._unavailable

    def _ensure_worker(self) -> str:
        """Start the worker if it is not running; return its version line."""
        if self._worker is not None and self._worker.alive():
            return self._version
        if self._worker is not None:
            self._worker.close()
        self._worker = ThoadWorker(thoad_python(), self._workdir / "worker.log")
        reply = self._worker.request({"cmd": "hello"}, timeout_s=180.0)
        return f"thoad {reply['thoad']} (python {reply['python']}, torch {reply['torch']})"

    def version(self) -> str:
        return self._version or "not started"

    def prepare(self, case: Case, inputs: tuple[Tensor, ...], device: str) -> Runner:
        self._ensure_worker()
        assert self._worker is not None
        inputs_path = self._workdir / "inputs.pt"
        torch.save(tuple(t.detach().cpu() for t in inputs), inputs_path)
        self._worker.request(
            {"cmd": "setup", "case": case.to_dict(), "inputs": str(inputs_path), "device": device,
             "threads": torch.get_num_threads()},
            self.timeout_s,
        )
        return ThoadRunner(self._worker, self._workdir, self.timeout_s)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        shutil.rmtree(self._workdir, ignore_errors=True)


PEERS = ("torch.func", "autograd.functional", "thoad")

ENGINE_NAMES = (
    "hod", "hod.compile",
    *(f"torch.func[{s}]" for s in TORCH_FUNC_SETTINGS),
    *(f"autograd.functional[{s}]" for s in AUTOGRAD_FUNCTIONAL_SETTINGS),
    "thoad",
)

#: What a run times unless told otherwise: compiling adds seconds to every row's warm-up.
DEFAULT_ENGINES = tuple(n for n in ENGINE_NAMES if n != "hod.compile")


def expand_engine_names(names: list[str]) -> list[str]:
    """Engine names from ``--engines``: a peer's plain name stands for all its settings.

    Returns full names in the order of :data:`ENGINE_NAMES`; raises ValueError on unknown ones.
    """
    unknown = [n for n in names if n not in ENGINE_NAMES and n not in PEERS]
    if unknown:
        raise ValueError(
            f"unknown engines {unknown}; choose from {', '.join(ENGINE_NAMES)} (a peer's plain "
            f"name, e.g. torch.func, selects all its settings)"
        )
    return [e for e in ENGINE_NAMES if e in names or peer_of(e) in names]


def make_engines(names: list[str], thoad_timeout_s: float) -> list[Engine]:
    """Instantiate the named engines (see :func:`expand_engine_names`), in the order of
    :data:`ENGINE_NAMES`."""
    factories: dict[str, Callable[[], Engine]] = {
        "hod": HodEngine,
        "hod.compile": HodCompiledEngine,
        "thoad": lambda: ThoadEngine(timeout_s=thoad_timeout_s),
    }
    for setting in TORCH_FUNC_SETTINGS:
        factories[f"torch.func[{setting}]"] = lambda s=setting: TorchFuncEngine(s)
    for setting in AUTOGRAD_FUNCTIONAL_SETTINGS:
        factories[f"autograd.functional[{setting}]"] = lambda s=setting: AutogradFunctionalEngine(s)
    return [factories[n]() for n in expand_engine_names(names)]
