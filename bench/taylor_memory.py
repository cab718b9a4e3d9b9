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

from collections.abc import Callable
from typing import Any

from bench.memory import BASELINE, CALLS, MemoryResult, format_memory, measure
from bench.memory import main as memory_child_main
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


def _child_main(engine: str, row: TaylorRow, device: str) -> dict[str, object]:
    """Body of a child: build the row's inputs, make the engine's calls (none for the baseline)."""
    inputs = make_inputs(row, row_seed(row, 0))
    if engine == BASELINE:
        return {"status": "ok"}
    return {"status": "ok", "call_ms": [1e3 * s for s in _calls(engine, row, inputs)]}


if __name__ == "__main__":
    memory_child_main(_child_main, TaylorRow.from_dict)
