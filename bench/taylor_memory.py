"""Peak memory of the taylor sweep's engines (``python -m bench.run --memory --sweeps taylor``).

Each engine runs alone in a fresh child process on :data:`MEMORY_ROWS` (the exact Laplacian of
the paper's MLP at batch 32, and the PINN step), as :mod:`bench.memory` does for the derivative
sweeps: the parent reads the child's peak RSS from ``os.wait4``; a ``baseline`` child per
interpreter builds the inputs only. This module is the child (``python -m bench.taylor_memory
--child ENGINE --case ROW``, the jet-for-pytorch settings under the Python 3.12 environment); it
prints one JSON line with its call times (warm-up and two more; not checked here: the sweep
checks them).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from bench.memory import BASELINE, CALLS, MemoryResult, format_memory, measure
from bench.runner import row_seed
from bench.taylor_rows import TAYLOR_ROWS, TaylorRow, make_inputs

#: The rows measured: the exact Laplacian at batch 32 and the PINN step.
MEMORY_ROWS = tuple(r for r in TAYLOR_ROWS if (r.kind, r.batch) in
                    {("laplacian", 32), ("pinn", 32)})
#: The engines measured; the jet-for-pytorch ones run under the Python 3.12 environment.
MEMORY_ENGINES = ["hod", "jet[collapsed]", "jet[standard]", "torch.func"]
JET_ENGINES = ("jet[collapsed]", "jet[standard]")


def _calls(engine: str, row: TaylorRow, inputs: dict[str, Any]) -> list[float]:
    """Seconds of the warm-up call and the ones after it (CALLS in all)."""
    if engine in JET_ENGINES:
        from bench.jet_worker import JetCase

        case = JetCase(row, inputs, engine[len("jet["):-1])
        call: Callable[[], float] = case.call
    else:
        from bench.taylor import HodTaylorEngine, TorchFuncTaylorEngine

        chosen = HodTaylorEngine() if engine == "hod" else TorchFuncTaylorEngine()
        if (reason := chosen.unavailable_reason()) is not None:
            raise RuntimeError(reason)
        call = chosen.prepare(row, inputs).time_call
    return [call() for _ in range(CALLS)]


def measure_taylor(timeout_s: float, log: Callable[[str], None] = print
                   ) -> list[tuple[TaylorRow, list[MemoryResult]]]:
    """Peak RSS of a baseline per interpreter and of every engine on each row."""
    return [(row, measure(MEMORY_ENGINES, row, "cpu", timeout_s, log,
                          module="bench.taylor_memory", env_engines=JET_ENGINES,
                          env_label="3.12 env"))
            for row in MEMORY_ROWS]


def format_taylor_memory(measured: list[tuple[TaylorRow, list[MemoryResult]]]) -> str:
    """The tables of :func:`measure_taylor`'s results, one per row."""
    return "\n\n".join(format_memory(row, results) for row, results in measured)


def main() -> None:
    parser = argparse.ArgumentParser(description="taylor peak-memory child")
    parser.add_argument("--child", required=True)
    parser.add_argument("--case", required=True, help="TaylorRow as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row = TaylorRow.from_dict(json.loads(args.case))
    inputs = make_inputs(row, row_seed(row, 0))
    try:
        report: dict[str, object] = {"status": "ok"}
        if args.child != BASELINE:
            report["call_ms"] = [1e3 * s for s in _calls(args.child, row, inputs)]
    except Exception as exc:
        from bench.engines import failure_kind

        report = {"status": failure_kind(exc), "detail": f"{type(exc).__name__}: {exc}"[:300]}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
