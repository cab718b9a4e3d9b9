"""thoad worker: runs under the Python 3.12 environment, driven by ``bench.engines.ThoadEngine``.

Started as ``<venv312>/bin/python -m bench.thoad_worker`` from the repository root. It reads one
JSON request per line on stdin and writes one JSON reply per line on the original stdout
(anything else printed goes to stderr). Requests:

* ``{"cmd": "hello"}`` -> versions.
* ``{"cmd": "setup", "case": {...}, "inputs": "in.pt", "device": "cpu", "threads": 2}``: use the
  harness's number of torch threads, load ``(X, *params)`` saved by the harness (the very tensors
  the other engines get) and mark them as the seed does: ``X.requires_grad_(True)``, params
  ``requires_grad_(param_grad)``.
* ``{"cmd": "warmup", "result": "out.pt"}``: one call, then fetch every derivative block
  expanded to torch.func's layout (:func:`expanded_block`) and save them as ``{index tuple:
  tensor}``; replies with the call's time.
* ``{"cmd": "time"}``: one timed call (forward, ``backward`` and ``ctrl.clear()``, as in the seed).
* ``{"cmd": "quit"}``.

Errors are replied as ``{"ok": false, "kind": "OOM" | "ERROR", "error": "..."}``.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import sys
import time
from typing import Any

import torch
from torch import Tensor

from bench.engines import serve_stdio
from bench.models import Case


class ThoadCase:
    """One case set up for thoad, with the seed's call."""

    def __init__(self, case: Case, inputs: tuple[Tensor, ...], device: str) -> None:
        self.case = case
        self.device = device
        X, *params = (t.to(device) for t in inputs)
        X.requires_grad_(True)
        for P in params:
            P.requires_grad_(case.param_grad)
        self.inputs = (X, *params)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _backward(self) -> Any:
        from thoad import backward

        T = self.case.forward(self.device)(*self.inputs)
        return backward(tensor=T, order=self.case.order, crossings=self.case.param_grad,
                        keep_batch=True)

    def call(self) -> float:
        """The timed call, exactly as the seed times thoad."""
        self._sync()
        start = time.perf_counter()
        ctrl = self._backward()
        ctrl.clear()
        self._sync()
        return time.perf_counter() - start

    def warmup(self, result_path: str) -> float:
        """First call, then fetch and save every derivative block (fetching is not timed)."""
        self._sync()
        start = time.perf_counter()
        ctrl = self._backward()
        self._sync()
        seconds = time.perf_counter() - start
        blocks: dict[tuple[int, ...], Tensor] = {}
        for index in itertools.product(range(self.case.n_inputs), repeat=self.case.order):
            variables = tuple(self.inputs[i] for i in index)
            blocks[index] = expanded_block(ctrl, variables)
        ctrl.clear()
        torch.save(blocks, result_path)
        return seconds


def expanded_block(ctrl: Any, variables: tuple[Tensor, ...]) -> Tensor:
    """The full block ``d^n f / d variables`` in torch.func's layout (``x_i1.shape + ...``).

    ``backward(keep_batch=True)`` keeps compact blocks (batch axes shared, not expanded);
    ``fetch_hgrad(keep_batch=False)`` expands them into the full block, in the order of
    ``variables``, with a leading axis for the output, of size 1 here (a scalar output), which
    is dropped. A block of any other shape is passed on as is, and the harness's check fails it.
    """
    block, _meta = ctrl.fetch_hgrad(variables=variables, keep_batch=False)
    full = tuple(size for v in variables for size in v.shape)
    if tuple(block.shape) == (1, *full):
        block = block[0]
    return block.detach().cpu()


def _handle(request: dict[str, Any], state: dict[str, ThoadCase]) -> dict[str, Any]:
    cmd = request["cmd"]
    if cmd == "hello":
        return {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "thoad": importlib.metadata.version("thoad"),
        }
    if cmd == "setup":
        state.pop("case", None)
        torch.set_num_threads(request["threads"])
        inputs = torch.load(request["inputs"])
        state["case"] = ThoadCase(Case.from_dict(request["case"]), inputs, request["device"])
        return {}
    if cmd == "warmup":
        return {"seconds": state["case"].warmup(request["result"])}
    if cmd == "time":
        return {"seconds": state["case"].call()}
    raise ValueError(f"unknown command {cmd!r}")


def main() -> None:
    state: dict[str, ThoadCase] = {}
    serve_stdio(lambda request: _handle(request, state))


if __name__ == "__main__":
    main()
