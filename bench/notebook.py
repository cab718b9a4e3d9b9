"""Running the sweeps one at a time from a notebook (``notebooks/seed_benchmark.ipynb``).

A :class:`NotebookSession` holds the engines (and the thoad worker) for the whole notebook;
:meth:`NotebookSession.run` runs one sweep through :class:`bench.runner.SweepRunner`, prints the
harness's table and check lines, and keeps the rows for the closing summary. ``scale`` picks
the rows and the repetition policy:

* ``quick``: the rows of ``--quick`` and its policy (3-10 calls, 0.3 s per engine and row);
* ``mid``: every other row of each seed sweep from the smallest, plus the largest, and every row
  of the order-3/4 sweeps (small sizes), with the ``--quick`` policy;
* ``full``: every row with the full policy (5-50 calls, 2 s), as ``python -m bench.run``.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import replace

from bench.engines import DEFAULT_ENGINES
from bench.models import SWEEPS, Sweep
from bench.report import check_summary, format_table, machine_info, speedup_summary
from bench.run import make_runner
from bench.runner import RowResult

SCALES = ("quick", "mid", "full")


def scaled(sweep: Sweep, scale: str) -> Sweep:
    """``sweep`` cut down to the rows run at ``scale`` (see the module docstring)."""
    if scale == "quick":
        cases = tuple(sweep.selected(quick=True))
    elif scale == "mid" and sweep.numeric_x:
        last = len(sweep.cases) - 1
        cases = tuple(c for i, c in enumerate(sweep.cases) if i % 2 == 0 or i == last)
    elif scale in SCALES:
        cases = sweep.cases
    else:
        raise ValueError(f"unknown scale {scale!r}; choose from {SCALES}")
    return replace(sweep, cases=cases, quick=tuple(range(len(cases))))


class NotebookSession:
    """The engines of a notebook run, and the rows of every sweep run so far."""

    def __init__(self, scale: str, engines: tuple[str, ...] = DEFAULT_ENGINES, seed: int = 0):
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose from {SCALES}")
        self.scale = scale
        self.runner = make_runner(list(engines), quick=scale != "full", seed=seed,
                                  log=lambda _line: None)
        self.results: list[tuple[Sweep, list[RowResult]]] = []

    def machine(self) -> str:
        """Software, CPU, cores, threads and engine versions, one fact a line."""
        info = machine_info("cpu")
        facts = {
            "torch": info["torch"],
            "python": info["python"],
            "CPU": f"{info['cpu_model']} ({info['processor']})",
            "cores": f"{info.get('physical_cores', '?')} physical, "
                     f"{info['logical_cores']} logical",
            "torch threads": info["torch_threads"],
            "load average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
            "git commit": info["git_commit"],
        }
        for engine in self.runner.engines:
            facts[engine.name] = self.runner.absent.get(engine.name) or engine.version()
        return "\n".join(f"{k:20s} {v}" for k, v in facts.items())

    def plan(self) -> str:
        """The rows each sweep runs at this scale, one sweep a line."""
        lines = []
        for sweep in SWEEPS.values():
            chosen = scaled(sweep, self.scale)
            xs = [str(chosen.x_value(c)) for c in chosen.cases]
            lines.append(f"{sweep.name:15s} {len(xs):2d}/{len(sweep.cases):2d}: {', '.join(xs)}")
        return "\n".join(lines)

    def run(
        self, name: str, engines: Collection[str] | None = None
    ) -> tuple[Sweep, list[RowResult]]:
        """Run the sweep ``name`` at this scale (with the session's engines, or those of them
        named in ``engines``), print its table and checks, keep its rows."""
        sweep = scaled(SWEEPS[name], self.scale)
        rows = self.runner.run_sweep(sweep, quick=False, only=engines)
        self.results.append((sweep, rows))
        print(format_table(sweep, rows))
        print("\n".join(check_summary(rows)))
        return sweep, rows

    def summary(self) -> str:
        """hod's speedup over the best peer per sweep run so far (see ``speedup_summary``)."""
        return speedup_summary(self.results)

    def close(self) -> None:
        """Stop the engines (the thoad worker)."""
        for engine in self.runner.engines:
            engine.shutdown()
