"""Build notebooks/seed_benchmark.ipynb (the seed benchmark notebook redone with hod and its
peers side by side) and execute it in place.

Run from anywhere::

    python notebooks/make_seed_benchmark.py                # mid scale, a few minutes on 2 cores
    python notebooks/make_seed_benchmark.py --scale full   # every row, full repetition policy

Needs the ``bench`` extra (nbformat, nbclient, ipykernel, matplotlib, psutil) and, for thoad, the
environment of ``bench/setup_thoad_env.sh``. Every sweep runs through the harness's Python API
(:class:`bench.notebook.NotebookSession`); see bench/README.md for what is timed and checked.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "seed_benchmark.ipynb"

SCALE_NOTES = {
    "quick": "the harness's `--quick` rows (3-4 per sweep) and its short repetition policy "
             "(3-10 timed calls, about 0.3 s per engine and row)",
    "mid": "every other row of each seed sweep from the smallest, plus the largest, and every "
           "row of the order-3/4 sweeps, with the `--quick` repetition policy (3-10 timed calls, "
           "about 0.3 s per engine and row)",
    "full": "every row of every sweep with the full repetition policy (5-50 timed calls, about "
            "2 s per engine and row), as `python -m bench.run`",
}

INTRO = """# The seed benchmark, redone with hod

The seed notebook timed `torch.autograd.functional` against
[thoad](https://pypi.org/project/thoad/) on the Jacobian and the Hessian of a small MLP, in twelve
sweeps over batch size, parameter size and depth, w.r.t. the input `X` alone and w.r.t. `X` and
every weight. This notebook runs the same sweeps, in the same order and with the same sizes, through
the benchmark harness in `bench/` (see `bench/README.md`), with these engines side by side:

* **hod**: `hod.derivative(f, order, argnums)`, built once per row (its first call traces and
  generates code, untimed);
* **torch.func**, three settings: `[fwd-rev]` (`jacrev`, `torch.func.hessian`, and `jacrev`
  inside `jacfwd`s beyond order 2), `[rev]` (`jacrev` nested, orders 2 and 3) and `[fwd]`
  (`jacfwd`, order 1);
* **autograd.functional**, three settings of `torch.autograd.functional.jacobian` / `hessian`:
  `[seed]` called exactly as the seed calls them, `[vectorize]` with `vectorize=True`, and
  `[vectorize-fwd]` (Hessians) also with `outer_jacobian_strategy="forward-mode"` (orders 1 and 2
  only);
* **thoad**: `backward(tensor=f(X, *params), order=n, crossings=..., keep_batch=True)` then
  `ctrl.clear()`, as in the seed, in a Python 3.12 worker process that times its own calls;
* **hod.compile**, on the order-3/4 sweeps only: hod with `compile=True`, its generated code run
  through `torch.compile` (the first call also compiles, untimed; compiling every Jacobian and
  Hessian row as well would add minutes to the run).

Every timed call includes the forward pass; the engines of a row are timed interleaved and the
tables show **median milliseconds** of every engine setting and **hod's speedup** (`2.00x`: hod
takes half the time) over the fastest peer setting of the row (named) and over each peer's best
setting. A setting whose warm-up is over 100 ms and 10x slower than another setting of the same
peer is not timed on that row (`SKIPPED`).

The seed read its MLP out with `T.sum()`, which with a softmax head is the batch size whatever
the inputs (softmax rows sum to one): every derivative is zero, and no check could tell a wrong
engine. So the harness times and checks the same layers with a weighted read-out
`(T * R).sum()` (`R` fixed, non-uniform) on centred inputs. During the untimed warm-up each
engine's result is compared block by block, in relative error (2e-4), with torch.func in
float64: an engine that fails is shown as **`WRONG`** and not timed, with the reason under the
table; the `check` lines give each engine's largest relative error.

**Scale of this run: `{scale}`**: {scale_note}. The rows run are listed below. Regenerate with
`python notebooks/make_seed_benchmark.py --scale {{quick,mid,full}}`.

Every engine (and the thoad worker) runs with **one torch thread**, the harness's default: the
tensors are small, and when other processes keep the cores busy torch's multi-threaded kernels
wait on descheduled threads and their timings blow up."""

SETUP = """import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "bench" / "runner.py").exists())
sys.path.insert(0, str(ROOT))

from bench.engines import DEFAULT_ENGINES, ENGINE_NAMES  # noqa: E402
from bench.notebook import NotebookSession  # noqa: E402
from bench.report import plot_sweep  # noqa: E402
from bench.run import warn_if_busy  # noqa: E402

SCALE = "{scale}"
torch.set_num_threads(1)
started = time.perf_counter()
session = NotebookSession(SCALE, engines=ENGINE_NAMES)
print(session.machine())
warn_if_busy()"""

PLAN = """print(f"scale {SCALE}: rows run / rows in the sweep")
print(session.plan())"""

MODEL = """import inspect

from bench import models

for fn in (models.relu_softmax_layers, models.relu_softmax_mlp, models.tanh_layers,
           models.tanh_mlp, models.readout_weights, models.weighted_forward):
    print(inspect.getsource(fn))"""

SWEEP_CODE = """sweep, rows = session.run("{name}"{engines})
plot_sweep(sweep, rows)
plt.show()"""

SUMMARY = """elapsed = time.perf_counter() - started
print(f"hod's speedup over the fastest peer of each row ({SCALE} scale, {elapsed:.0f} s in all)")
print(session.summary())
session.close()"""

# (heading, sentence, [(sweep, what the seed measured), ...]) in the seed notebook's order.
SECTIONS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Jacobians of the MLP",
     "The seed's *Benchmark jacobians on full MLP*: `autograd.functional.jacobian` against "
     "thoad's `backward(order=1)`.",
     [("jac_x_batch", "The Jacobian w.r.t. `X`, batch size 10 to 80 (width 10, 3 layers)."),
      ("jac_x_width", "The Jacobian w.r.t. `X`, parameter size 10 to 80 (batch 10, 3 layers)."),
      ("jac_x_depth", "The Jacobian w.r.t. `X`, depth 2 to 20 (batch 60, width 20)."),
      ("jac_all_batch", "The Jacobian w.r.t. `X` and every weight, batch size 5 to 50 "
                        "(width 10, 3 layers)."),
      ("jac_all_width", "The Jacobian w.r.t. `X` and every weight, parameter size 5 to 50 "
                        "(batch 10, 3 layers)."),
      ("jac_all_depth", "The Jacobian w.r.t. `X` and every weight, depth 2 to 6 "
                        "(batch 10, width 10).")]),
    ("Hessians of the MLP",
     "The seed's *Benchmark hessians on full MLP*: `autograd.functional.hessian` against "
     "thoad's `backward(order=2)`.",
     [("hess_x_batch", "The Hessian w.r.t. `X`, batch size 10 to 80 (width 10, 3 layers)."),
      ("hess_x_width", "The Hessian w.r.t. `X`, parameter size 10 to 80 (batch 10, 3 layers)."),
      ("hess_x_depth", "The Hessian w.r.t. `X`, depth 2 to 10 (width 20; batch 10, left over "
                       "from the seed's previous cell)."),
      ("hess_all_batch", "The Hessian w.r.t. `X` and every weight (all cross blocks), batch size "
                         "5 to 50 (width 10, 3 layers)."),
      ("hess_all_width", "The Hessian w.r.t. `X` and every weight, parameter size 5 to 50 "
                         "(batch 10, 3 layers)."),
      ("hess_all_depth", "The Hessian w.r.t. `X` and every weight, depth 2 to 8 "
                         "(batch 10, width 10).")]),
    ("Orders 3 and 4 (not in the seed)",
     "The harness's extra sweeps: small sizes, both the seed's MLP and a tanh MLP (non-zero "
     "derivatives); torch.func nests `jacrev` in `jacfwd`s, autograd.functional has no such order; "
     "hod.compile is hod with `compile=True`.",
     [("o3_x", "The order-3 derivative w.r.t. `X`."),
      ("o3_all", "The order-3 derivative w.r.t. `X` and every weight."),
      ("o4_x", "The order-4 derivative w.r.t. `X`."),
      ("o4_all", "The order-4 derivative w.r.t. `X` and every weight.")]),
]


def header_cells(scale: str) -> list[tuple[str, str]]:
    """Introduction, setup and machine info, the rows run, and the MLP definitions."""
    return [
        ("md", INTRO.format(scale=scale, scale_note=SCALE_NOTES[scale])),
        ("code", SETUP.format(scale=scale)),
        ("md", "Rows run at this scale (sizes, or the row labels of the order-3/4 sweeps):"),
        ("code", PLAN),
        ("md", "## The MLP\n\nThe seed's `foward_pass`, as the harness defines it, the tanh "
               "variant of the order-3/4 sweeps, and the weighted read-out that every row uses. "
               "Inputs are float32, drawn with `torch.rand` as in the seed (seeded per row), then "
               "centred and scaled (`bench.models.make_inputs`); `X` is `(batch, width)`, each "
               "weight `(width, width)`."),
        ("code", MODEL),
    ]


#: The sweeps that also time hod with ``compile=True``.
COMPILED_SWEEPS = ("o3_x", "o3_all", "o4_x", "o4_all")


def sweep_cells() -> list[tuple[str, str]]:
    """One section per group of sweeps: what the seed measured, the table, the plot."""
    cells = []
    for heading, sentence, sweeps in SECTIONS:
        cells.append(("md", f"## {heading}\n\n{sentence}"))
        for name, measured in sweeps:
            engines = "" if name in COMPILED_SWEEPS else ", engines=DEFAULT_ENGINES"
            cells.append(("md", f"### `{name}`\n\n{measured}"))
            cells.append(("code", SWEEP_CODE.format(name=name, engines=engines)))
    return cells


def summary_cells() -> list[tuple[str, str]]:
    """The closing table of hod's speedups per sweep."""
    text = ("## Summary\n\nPer sweep, hod's speedup over the fastest peer setting of each row, "
            "over each peer's best setting (with how many rows each setting was the best) and "
            "hod.compile's over the fastest peer: min / median / max over the rows where both "
            "have a checked time (below 1.00 the peer is faster; \"k of n rows\" when some rows "
            "have none: `WRONG`, `n/a`, `SKIPPED`, `unchecked`).")
    return [("md", text), ("code", SUMMARY)]


def build(scale: str) -> nbformat.NotebookNode:
    """The notebook for ``scale``, not executed."""
    nb = nbformat.v4.new_notebook()
    make = {"md": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    cells = header_cells(scale) + sweep_cells() + summary_cells()
    nb.cells = [make[kind](source) for kind, source in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALE_NOTES), default="mid",
                        help="rows and repetitions of every sweep (default mid)")
    args = parser.parse_args()
    nb = build(args.scale)
    start = time.perf_counter()
    NotebookClient(nb, timeout=3600, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, OUTPUT)
    print(f"wrote {OUTPUT} ({time.perf_counter() - start:.0f} s to execute)")


if __name__ == "__main__":
    main()
