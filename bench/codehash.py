"""One hash over the code hod generates for every benchmark row (a refactor must keep it).

For each row of every sweep (:data:`bench.models.SWEEPS`) this builds what the ``hod`` engine
builds, ``hod.derivative(f, order, argnums)`` on the row's inputs, and hashes what that
signature runs: the ordinary generated code (``Lowered.code``), the planned variant that
runs on plain CPU tensors (``Lowered.planned_module``: reused memory, collapsed view
chains) with the layout of that memory, the constants both read, the mode, the seed space
size and where a first linear layer was split off; and the code the ``hod.compile`` engine
hands to ``torch.compile`` (``compile=True``, built but not compiled: that happens on the
first call). Run from the repository root::

    python -m bench.codehash              # one sha256 over all rows
    python -m bench.codehash --verbose    # and one line per row
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from torch import fx

import hod
from bench.models import SWEEPS, Case, make_inputs
from bench.runner import row_seed


def _constants(gm: fx.GraphModule) -> list[str]:
    """Each tensor the code reads by name: name, shape, dtype and a hash of its bytes."""
    lines = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = getattr(gm, node.target)
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            digest = hashlib.sha256(data).hexdigest()
            lines.append(f"{node.target} {tuple(t.shape)} {t.dtype} {digest}")
    return lines


def row_text(case: Case) -> str:
    """Everything of the row's generated function that decides what runs."""
    inputs = make_inputs(case, row_seed(case, 0), "cpu")
    forward = case.forward("cpu")
    lowered = hod.derivative(forward, case.order, argnums=case.argnums).lower(*inputs)
    parts = [
        f"mode {lowered.mode} seeds {lowered.seed_size} split {lowered.first_layer!r}",
        lowered.code, *_constants(lowered.graph_module),
    ]
    planned = lowered.planned_module
    if planned is not None:
        parts += ["-- planned", planned.code, *_constants(planned)]
    memory = lowered.memory
    if memory is not None:
        slots = [(s.shape, s.dtype) for s in memory.slots]
        parts += [f"-- memory {memory.arena_size} {memory.arena_layout} {slots}"]
    compiled = hod.derivative(
        forward, case.order, argnums=case.argnums, compile=True
    ).lower(*inputs)
    parts += ["-- for torch.compile", compiled.code, *_constants(compiled.graph_module)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codehash", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="one hash per row as well")
    parser.add_argument("--sweeps", default="all", help="comma-separated sweeps, default all")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = list(SWEEPS) if args.sweeps == "all" else args.sweeps.split(",")
    total = hashlib.sha256()
    rows, start = 0, time.perf_counter()
    for name in names:
        for case in SWEEPS[name].cases:
            text = row_text(case)
            total.update(f"{name} {case.label()}\n{text}\n".encode())
            rows += 1
            if args.verbose:
                row_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
                print(f"{name:15s} {case.label():36s} {row_hash}", flush=True)
    seconds = time.perf_counter() - start
    print(f"{total.hexdigest()}  ({rows} rows, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
