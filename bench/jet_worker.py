"""jet-for-pytorch worker: runs under the Python 3.12 environment, driven by ``bench.taylor``.

Started as ``<venv312>/bin/python -m bench.jet_worker`` from the repository root. It reads one
JSON request per line on stdin and writes one JSON reply per line on the original stdout
(anything else printed goes to stderr), like :mod:`bench.thoad_worker`. Requests:

* ``{"cmd": "hello"}`` -> versions.
* ``{"cmd": "setup", "setting": "collapsed", "row": {...}, "inputs": "in.pt", "threads": 1}``:
  load the row's inputs saved by the harness (the very tensors the other engines get) and build
  the setting's callable (:func:`build`), kept under the setting's name.
* ``{"cmd": "warmup", "setting": ..., "result": "out.pt"}``: the first call, timed; its result
  saved as :data:`~bench.taylor_rows.Blocks`. On a stochastic row torch's generator is seeded
  with the row's ``direction_seed`` first, so that the directions drawn are the row's ``V``.
* ``{"cmd": "time", "setting": ...}``: one timed call.
* ``{"cmd": "quit"}``.

Errors are replied as ``{"ok": false, "kind": "OOM" | "ERROR", "error": "..."}``.

What is timed is the jet-for-pytorch paper's own benchmark setup (its
``exp01_benchmark_laplacian``): ``jet.laplacian`` / ``jet.bilaplacian`` of the per-datum function
with ``collapsed=True`` (``collapsed``) or ``False`` (``standard``), with
``randomization=("rademacher", S)`` on the stochastic row, captured with
``jet.tracing.capture_graph``, simplified with ``jet.common_subexpression_elimination``, then
``torch.func.vmap`` over the batch (``randomness="different"`` when random); ``collapsed+compile``
passes that to ``torch.compile`` as the paper's ``--compiled`` runs do (compiled in the warm-up
call). The PINN step adds the loss and ``torch.autograd.grad`` to the parameters, which the
captured graph holds.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bench.engines import serve_stdio
from bench.taylor_rows import (
    Blocks,
    TaylorRow,
    as_blocks,
    mlp,
    pinn_blocks,
    pinn_loss,
    tracked,
)

#: The settings of jet-for-pytorch this worker runs: (``collapsed``, through torch.compile).
SETTINGS = {"collapsed": (True, False), "standard": (False, False),
            "collapsed+compile": (True, True)}


def build(row: TaylorRow, inputs: dict[str, Any], collapsed: bool,
          compiled: bool) -> Callable[[], object]:
    """The setting's thunk on the row (module docstring); raises ValueError on an HVP row."""
    import jet
    from jet.tracing import capture_graph

    if row.kind == "hvp":
        raise ValueError("jet-for-pytorch has no Hessian-vector product transform")
    X = inputs["X"]
    params = inputs["params"]
    if row.kind == "pinn":
        params = tracked(params)

    def u(x: Tensor) -> Tensor:  # one datum (D,) -> (1,), the parameters captured
        return mlp(x, *params)

    randomization = ("rademacher", row.samples) if row.kind == "stochastic" else None
    if row.kind == "biharmonic":
        operator = jet.bilaplacian(u, (X[0],), collapsed=collapsed)
    else:
        operator = jet.laplacian(u, (X[0],), collapsed=collapsed, randomization=randomization)
    graph, _ = capture_graph(operator, (X[0],))
    jet.common_subexpression_elimination(graph.graph)
    graph.recompile()
    batched = torch.func.vmap(graph, randomness="error" if randomization is None else "different")
    if compiled:
        # Inductor draws its own random numbers unless told to call torch's: with them, the
        # directions are those of the eager call, which the harness reproduces for the check.
        torch._inductor.config.fallback_random = randomization is not None
        batched = torch.compile(batched)
    if row.kind == "pinn":
        s = inputs["s"]
        return lambda: pinn_blocks(pinn_loss(batched(X), s), params)
    return lambda: batched(X)


class JetCase:
    """One setting of jet-for-pytorch set up on one row."""

    def __init__(self, row: TaylorRow, inputs: dict[str, Any], setting: str) -> None:
        self.row = row
        self.inputs = inputs
        self.thunk = build(row, inputs, *SETTINGS[setting])

    def call(self) -> float:
        start = time.perf_counter()
        self.thunk()
        return time.perf_counter() - start

    def warmup(self, result_path: str) -> float:
        """First call (the row's directions seeded on a stochastic row); saves its blocks."""
        if self.row.kind == "stochastic":
            torch.manual_seed(int(self.inputs["direction_seed"]))
        start = time.perf_counter()
        out = self.thunk()
        seconds = time.perf_counter() - start
        blocks: Blocks = {k: v.detach() for k, v in as_blocks(self.row, out).items()}
        torch.save(blocks, result_path)
        return seconds


def _handle(request: dict[str, Any], cases: dict[str, JetCase]) -> dict[str, Any]:
    cmd = request["cmd"]
    if cmd == "hello":
        return {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "jet": importlib.metadata.version("jet-for-pytorch"),
        }
    if cmd == "setup":
        cases.pop(request["setting"], None)
        torch.set_num_threads(request["threads"])
        inputs = torch.load(request["inputs"])
        row = TaylorRow.from_dict(request["row"])
        cases[request["setting"]] = JetCase(row, inputs, request["setting"])
        return {}
    if cmd == "warmup":
        return {"seconds": cases[request["setting"]].warmup(request["result"])}
    if cmd == "time":
        return {"seconds": cases[request["setting"]].call()}
    raise ValueError(f"unknown command {cmd!r}")


def main() -> None:
    cases: dict[str, JetCase] = {}
    serve_stdio(lambda request: _handle(request, cases))


if __name__ == "__main__":
    main()
