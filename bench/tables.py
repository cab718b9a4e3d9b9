"""Tables, sentences and a plot computed from a result file of ``python -m bench.run``.

The docs' benchmarks page and the README's summary are generated from a committed run
(``bench/runs/``) with these functions; nothing here is typed by hand::

    python -m bench.tables                          # summary of the newest committed full run
    python -m bench.tables RUN.json --sweeps        # per sweep, every engine setting's median
    python -m bench.tables --headline --png out.png

Conventions. An engine's time on a row counts only when its status is ``ok`` (checked and
timed); ``unchecked`` times (the row's reference failed), ``WRONG``, ``SKIPPED`` and the rest
are shown as marks and left out of every ratio. A peer timed with several settings
(``torch.func[fwd-rev]``, ``torch.func[rev]``, ...) counts with its best setting on each row;
the tables say which setting that was. A ratio is the peer's median divided by hod's
(``2.00`` means hod takes half the time).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HOD = "hod"
OK = "ok"
DEFAULT_FOLDER = Path(__file__).resolve().parent / "runs"

Row = dict[str, Any]
Run = dict[str, Any]

#: Short titles of the sweeps (the tables' first column).
SWEEP_TITLES = {
    "jac_x_batch": "Jacobian, x, batch", "jac_x_width": "Jacobian, x, width",
    "jac_x_depth": "Jacobian, x, depth", "jac_all_batch": "Jacobian, x+W, batch",
    "jac_all_width": "Jacobian, x+W, width", "jac_all_depth": "Jacobian, x+W, depth",
    "hess_x_batch": "Hessian, x, batch", "hess_x_width": "Hessian, x, width",
    "hess_x_depth": "Hessian, x, depth", "hess_all_batch": "Hessian, x+W, batch",
    "hess_all_width": "Hessian, x+W, width", "hess_all_depth": "Hessian, x+W, depth",
    "o3_x": "order 3, x", "o3_all": "order 3, x+W", "o4_x": "order 4, x", "o4_all": "order 4, x+W",
}


def peer_of(engine: str) -> str:
    """The engine name without its setting: ``torch.func[rev]`` -> ``torch.func``."""
    return engine.split("[", 1)[0]


def setting_of(engine: str) -> str:
    """The setting in an engine's name (``rev`` of ``torch.func[rev]``; empty if none)."""
    return engine[len(peer_of(engine)) + 1:-1] if "[" in engine else ""


def is_hod(engine: str) -> bool:
    """Whether ``engine`` is hod itself (``hod``) or a variant of it (``hod.compile``)."""
    return engine == HOD or engine.startswith(HOD + ".")


#: The ``kind`` of the taylor sweep in a result file: its own rows, engines and table
#: (:func:`taylor_grid`), left out of the summary, headline and plot of the derivative sweeps.
TAYLOR = "taylor"
#: The taylor sweep's matmul floor: timed beside the engines, never a peer.
FLOOR = "floor"
#: The setting the issue's targets name (#16: "jet-for-pytorch collapsed"): the taylor table
#: gives hod's ratio over it besides the one over jet's best setting.
TARGET_SETTING = "jet[collapsed]"


#: The ``kind`` of the per-sample sweep (vmap of hod and of torch.func): its own rows, engines
#: and table (:func:`per_sample_grid`), also left out of the summary, headline and plot.
PER_SAMPLE = "per-sample"


#: The ``kind`` of the zoo sweep (#18: real models in float32 against the best peer): its own
#: rows, engines and table (:func:`zoo_grid`), also left out of the summary, headline and plot.
ZOO = "zoo"


#: The ``kind`` of the chunks sweep (#20: ``chunk_size=`` and ``group=``): a memory row and a
#: distributed row, each its own table (:func:`chunks_grids`), also left out of the summary,
#: headline and plot.
CHUNKS = "chunks"


#: The ``kind`` of the sparse sweep (#19: ``sparse=True`` against dense engines and a
#: hand-coloured baseline): its own rows, engines and table (:func:`sparse_grid`), also left
#: out of the summary, headline and plot.
SPARSE = "sparse"
#: The engines of the sparse sweep that its ratios name.
SPARSE_HOD, SPARSE_DENSE, SPARSE_HAND = "hod sparse", "torch.func dense", "torch.func hand-coloured"


def derivative_sweeps(run: Run) -> list[dict[str, Any]]:
    """The run's sweeps but the taylor, per-sample, zoo, chunks and sparse ones."""
    own = (TAYLOR, PER_SAMPLE, ZOO, CHUNKS, SPARSE)
    return [s for s in run["sweeps"] if s.get("kind") not in own]


# --- loading ---------------------------------------------------------------------------------

def load_run(path: str | Path) -> Run:
    """The result file at ``path`` (JSON written by ``python -m bench.run``)."""
    return json.loads(Path(path).read_text())


def latest_run(folder: str | Path = DEFAULT_FOLDER) -> Path:
    """The newest full run in ``folder`` (by the time stamp in its name); the newest ``--quick``
    run only when there is no full one."""
    runs = sorted(p for p in Path(folder).glob("run-*.json") if not p.stem.endswith("-memory"))
    full = [p for p in runs if not p.stem.endswith("-quick")]
    chosen = full or runs
    if not chosen:
        raise FileNotFoundError(f"no run-*.json in {folder}; make one with python -m bench.run")
    return chosen[-1]


# --- per-row arithmetic ----------------------------------------------------------------------

def engines_of(run_or_sweep: dict[str, Any]) -> list[str]:
    """Engine names in the order of the first row that has them."""
    sweeps = run_or_sweep.get("sweeps", [run_or_sweep])
    names: list[str] = []
    for sweep in sweeps:
        for row in sweep["rows"]:
            names += [n for n in row["engines"] if n not in names]
    return names


def peers_of(engines: Sequence[str]) -> list[str]:
    """The peers (names without setting) among ``engines``, in order; hod's engines excluded."""
    return list(dict.fromkeys(peer_of(e) for e in engines if not is_hod(e)))


def time_ms(row: Row, engine: str) -> float | None:
    """The engine's median on the row when it is checked and timed (status ok), else None."""
    result = row["engines"].get(engine)
    if result is None or result["status"] != OK:
        return None
    return result["median_ms"]


def best_setting(row: Row, peer: str) -> tuple[float, str] | None:
    """The fastest ok setting of ``peer`` on the row: (median ms, engine name)."""
    timed = [(ms, e) for e in row["engines"]
             if not is_hod(e) and peer_of(e) == peer and (ms := time_ms(row, e)) is not None]
    return min(timed) if timed else None


def best_peer(row: Row) -> tuple[float, str] | None:
    """The fastest ok peer setting of the row: (median ms, engine name)."""
    timed = [b for p in peers_of(list(row["engines"])) if (b := best_setting(row, p))]
    return min(timed) if timed else None


def ratio(row: Row, peer: str | None = None, hod: str = HOD) -> tuple[float, str] | None:
    """``hod``'s speedup over ``peer``'s best setting (over the fastest peer when ``peer`` is
    None) on the row, and the engine it is measured against."""
    ours = time_ms(row, hod)
    theirs = best_peer(row) if peer is None else best_setting(row, peer)
    if ours is None or theirs is None:
        return None
    return theirs[0] / ours, theirs[1]


def spread(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(min, median, max) of ``values``, None when empty."""
    return (min(values), statistics.median(values), max(values)) if values else None


def fmt_ratio(value: float) -> str:
    """Three significant digits: 0.95, 2.37, 21.5, 146."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def fmt_spread(values: Sequence[float]) -> str:
    s = spread(values)
    return " / ".join(fmt_ratio(v) for v in s) if s else "-"


def mark(row: Row, engine: str) -> str:
    """A table cell: the median (ms) when ok, else the status (``unchecked`` with its time)."""
    result = row["engines"].get(engine)
    if result is None:
        return "-"
    if result["status"] == OK:
        return f"{result['median_ms']:.3f}"
    if result.get("median_ms") is not None:
        return f"{result['median_ms']:.3f} ({result['status']})"
    return result["status"]


# --- tables ----------------------------------------------------------------------------------

def _winners(rows: Sequence[Row], peer: str) -> str:
    """Which setting of ``peer`` was its best on how many rows (where hod has a time too)."""
    counts: Counter[str] = Counter()
    for row in rows:
        if (r := ratio(row, peer)) is not None:
            counts[setting_of(r[1]) or r[1]] += 1
    return ", ".join(f"{name} {n}" for name, n in counts.most_common())


def _ratio_cell(rows: Sequence[Row], peer: str | None, hod: str, winners: bool) -> str:
    ratios = [r[0] for row in rows if (r := ratio(row, peer, hod)) is not None]
    cell = fmt_spread(ratios)
    notes = []
    if ratios and len(ratios) < len(rows):
        notes.append(f"{len(ratios)} of {len(rows)} rows")
    if winners and peer is not None and ratios and (names := _winners(rows, peer)):
        notes.append(names)
    return f"{cell} ({'; '.join(notes)})" if notes else cell


def summary_grid(run: Run) -> list[list[str]]:
    """The summary as a list of rows (header first): per sweep, hod's speedup over the best peer
    and over each peer's best setting (min / median / max over the rows), and hod.compile's."""
    engines = engines_of({"sweeps": derivative_sweeps(run)})
    peers = peers_of(engines)
    hods = [e for e in engines if is_hod(e) and e != HOD]
    header = ["sweep", "rows", "hod vs the best peer", *(f"vs {p}" for p in peers),
              *(f"{h} vs the best peer" for h in hods)]
    grid = [header]
    for sweep in derivative_sweeps(run):
        rows = sweep["rows"]
        cells = [SWEEP_TITLES.get(sweep["name"], sweep["name"]), str(len(rows)),
                 _ratio_cell(rows, None, HOD, winners=False)]
        cells += [_ratio_cell(rows, p, HOD, winners=sum(peer_of(e) == p for e in engines) > 1)
                  for p in peers]
        cells += [_ratio_cell(rows, None, h, winners=False) for h in hods]
        grid.append(cells)
    return grid


def sweep_grid(sweep: dict[str, Any]) -> list[list[str]]:
    """One sweep as a list of rows (header first): the median of every engine setting per row
    (or its status), hod's speedup over the fastest peer setting (named) and over each peer's
    best setting, and that of every other hod engine over the fastest peer."""
    rows = sweep["rows"]
    engines = engines_of(sweep)
    peers = peers_of(engines)
    hods = [e for e in engines if is_hod(e) and e != HOD]
    header = [sweep["x_name"], *engines, "hod vs best", *(f"vs {p}" for p in peers),
              *(f"{h} vs best" for h in hods)]
    grid = [header]
    for row in rows:
        cells = [str(row["x"]), *(mark(row, e) for e in engines)]
        best = ratio(row)
        cells.append(f"{best[0]:.2f}x ({best[1]})" if best else "-")
        for peer in peers:
            r = ratio(row, peer)
            cells.append(f"{r[0]:.2f}x" + (f" ({setting_of(r[1])})" if setting_of(r[1]) else "")
                         if r else "-")
        cells += [f"{r[0]:.2f}x" if (r := ratio(row, None, h)) else "-" for h in hods]
        grid.append(cells)
    return grid


def taylor_grid(sweep: dict[str, Any]) -> list[list[str]]:
    """The taylor sweep as a list of rows (header first): every engine's median per row (or its
    status), then per hod engine (``hod``, ``hod.compile``) its speedup over each peer's best
    setting (named), over :data:`TARGET_SETTING` when jet has other settings too, and its time
    over the matmul floor's (``1.20x`` = 20% above the floor)."""
    engines = engines_of(sweep)
    peers = [p for p in peers_of(engines) if p != FLOOR]
    hods = [e for e in engines if is_hod(e)]
    target = [TARGET_SETTING] if sum(peer_of(e) == peer_of(TARGET_SETTING)
                                     for e in engines) > 1 else []
    header = [sweep["x_name"], *engines]
    for h in hods:
        header += [*(f"{h} vs {p}" for p in peers), *(f"{h} vs {t}" for t in target),
                   f"{h} / floor"]
    grid = [header]
    for row in sweep["rows"]:
        floor_ms = row["engines"].get(FLOOR, {}).get("median_ms")
        cells = [str(row["x"])]
        cells += [f"{floor_ms:.3f}" if e == FLOOR and floor_ms is not None else mark(row, e)
                  for e in engines]
        for h in hods:
            for peer in peers:
                r = ratio(row, peer, h)
                cells.append(f"{r[0]:.2f}x" + (f" ({setting_of(r[1])})" if setting_of(r[1])
                                                else "") if r else "-")
            ours = time_ms(row, h)
            for t in target:
                theirs = time_ms(row, t)
                cells.append(f"{theirs / ours:.2f}x" if ours and theirs is not None else "-")
            cells.append(f"{ours / floor_ms:.2f}x" if ours is not None and floor_ms else "-")
        grid.append(cells)
    return grid


def per_sample_grid(sweep: dict[str, Any]) -> list[list[str]]:
    """The per-sample sweep as a list of rows (header first): every engine's median per row (or
    its status), hod's speedup over each peer (``torch.func``) and over every other hod engine
    (``hod.summed``: ``2.00x`` = hod under vmap takes half its time), and ``lowered.examples``
    of hod's code under vmap (the batch when hod ran its own batched code)."""
    engines = engines_of(sweep)
    others = [e for e in engines if e != HOD]
    header = [sweep["x_name"], *engines, *(f"hod vs {e}" for e in others), "lowered.examples"]
    grid = [header]
    for row in sweep["rows"]:
        cells = [str(row["x"]), *(mark(row, e) for e in engines)]
        ours = time_ms(row, HOD)
        for other in others:
            theirs = time_ms(row, other)
            cells.append(f"{theirs / ours:.2f}x" if ours and theirs is not None else "-")
        grid.append([*cells, str(row.get("examples"))])
    return grid


def zoo_grid(sweep: dict[str, Any]) -> list[list[str]]:
    """The zoo sweep as a list of rows (header first): every engine's median per row (or its
    status), the fastest peer setting that passed its check, hod's speedup over it, and a last
    row with the median of those speedups over the rows that have one."""
    engines = engines_of(sweep)
    header = [sweep["x_name"], *engines, "best peer", "hod vs best peer"]
    grid = [header]
    ratios = []
    for row in sweep["rows"]:
        best, speedup = best_peer(row), ratio(row)
        if speedup is not None:
            ratios.append(speedup[0])
        grid.append([str(row["x"]), *(mark(row, e) for e in engines),
                     f"{best[1]} {best[0]:.3f}" if best else "-",
                     f"{speedup[0]:.2f}x" if speedup else "-"])
    median = f"{statistics.median(ratios):.2f}x" if ratios else "-"
    grid.append([f"median over the {len(ratios)} rows with a ratio", *[""] * (len(engines) + 1),
                 median])
    return grid


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ms(result: dict[str, Any]) -> str:
    return f"{result['median_ms']:.1f}" if result["status"] == OK else result["status"]


def chunks_memory_grid(row: Row) -> list[list[str]]:
    """The chunks sweep's memory row: per setting, its chunks, median time, peak RSS above
    the baseline and that peak over the unchunked setting's (the first)."""
    grid = [["setting", "chunks x seeds", "median ms", "peak above baseline MiB",
             "peak vs unchunked", "rel. error vs float64"]]
    results = list(row["engines"].items())
    unchunked = results[0][1].get("above_baseline_mib")
    for name, result in results:
        peak = result.get("above_baseline_mib")
        share = (f"{peak / unchunked:.2f}" if peak is not None and unchunked else "-")
        runs = (f"{result['chunks']} x {result['width']}" if "chunks" in result else "-")
        err = result.get("check_rel_err")
        grid.append([name, runs, _ms(result), _mib(peak), share,
                     "-" if err is None else f"{err:.1e}"])
    return grid


def chunks_distributed_grid(row: Row) -> list[list[str]]:
    """The chunks sweep's distributed row: per setting and number of processes, the median
    time, the largest rank's peak above its baseline, the largest share of the result a rank
    holds, and the checks."""
    grid = [["setting", "processes", "median ms (slowest rank)",
             "peak above baseline per rank MiB (largest)", "largest share per rank",
             "rel. error vs float64", "rel. diff vs 1-process hod"]]
    for name, result in row["engines"].items():
        err, diff = result.get("check_rel_err"), result.get("vs_single_rel")
        grid.append([name.rsplit(", ", 1)[0], str(result["processes"]), _ms(result),
                     _mib(result.get("peak_above_baseline_mib")),
                     f"{result['share']:.2f}" if "share" in result else "-",
                     "-" if err is None else f"{err:.1e}", "-" if diff is None else f"{diff:.1e}"])
    return grid


def chunks_grids(sweep: dict[str, Any]) -> list[list[list[str]]]:
    """The chunks sweep's tables: its memory row's, then its distributed row's."""
    grids = {"memory": chunks_memory_grid, "distributed": chunks_distributed_grid}
    return [grids[row["part"]](row) for row in sweep["rows"]]


def _speedup(row: Row, other: str) -> str:
    ours, theirs = time_ms(row, SPARSE_HOD), time_ms(row, other)
    return f"{fmt_ratio(theirs / ours)}x" if ours and theirs is not None else "-"


def sparse_grid(sweep: dict[str, Any]) -> list[list[str]]:
    """The sparse sweep as a list of rows (header first): per row its variables, the
    pattern's nonzeros and colours, the entries hod's result stores over the nonzeros, hod
    sparse's first call, every engine's median ms (or its status), and hod sparse's speedups
    over dense torch.func and over the hand-coloured baseline."""
    engines = engines_of(sweep)
    grid = [[sweep["x_name"], "n", "nnz", "colours", "stored / nnz", "first call ms",
             *engines, "vs dense torch.func", "vs hand-coloured"]]
    for row in sweep["rows"]:
        stored = (f"{row['stored'] / row['nnz']:.2f}" if row.get("nnz") else "-")
        first = row.get("first_call_ms")
        grid.append([str(row["x"]), f"{row['n']:,}",
                     f"{row['nnz']:,}" if "nnz" in row else "-",
                     str(row.get("colours", "-")), stored,
                     "-" if first is None else f"{first:.0f}",
                     *(mark(row, e) for e in engines),
                     _speedup(row, SPARSE_DENSE), _speedup(row, SPARSE_HAND)])
    return grid


def problem_notes(sweep: dict[str, Any]) -> list[str]:
    """Per engine and status other than ok, the first row with it and why."""
    seen: set[tuple[str, str]] = set()
    notes = []
    for row in sweep["rows"]:
        for name, result in row["engines"].items():
            key = (name, result["status"])
            if result["status"] != OK and key not in seen:
                seen.add(key)
                notes.append(f"{name}: {result['status']} from {row['x']}: {result['detail']}")
    return notes


def markdown(grid: list[list[str]]) -> str:
    """A list of rows (header first) as a markdown table."""
    lines = ["| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
    lines += ["| " + " | ".join(cells) + " |" for cells in grid[1:]]
    return "\n".join(lines)


def summary_table(run: Run) -> str:
    """Markdown: one line per sweep (see :func:`summary_grid`)."""
    return markdown(summary_grid(run))


def sweep_tables(run: Run) -> str:
    """Markdown: per sweep, a heading, the table of :func:`sweep_grid` and the status notes."""
    parts = []
    for sweep in run["sweeps"]:
        parts.append(f"### {SWEEP_TITLES.get(sweep['name'], sweep['name'])} "
                     f"(`{sweep['name']}`: {sweep['title']}), median ms")
        grids = {TAYLOR: taylor_grid, PER_SAMPLE: per_sample_grid, ZOO: zoo_grid,
                 SPARSE: sparse_grid}
        if sweep.get("kind") == CHUNKS:
            parts += [f"**{row['label']}**\n\n{markdown(grid)}"
                      for row, grid in zip(sweep["rows"], chunks_grids(sweep), strict=True)]
        else:
            parts.append(markdown(grids.get(sweep.get("kind"), sweep_grid)(sweep)))
        notes = [*sweep.get("notes", []), *problem_notes(sweep)]
        if notes:
            parts.append("\n".join(f"* {n}" for n in notes))
    return "\n\n".join(parts)


# --- headline --------------------------------------------------------------------------------

def _rows_of(run: Run, orders: Sequence[int]) -> list[Row]:
    return [row for sweep in derivative_sweeps(run) for row in sweep["rows"]
            if row["case"]["order"] in orders]


def _extreme(rows: Sequence[Row], what: str) -> str:
    """A sentence part on hod against the fastest peer over ``rows``: median and lowest row."""
    ratios = [(r[0], r[1], row) for row in rows if (r := ratio(row)) is not None]
    if not ratios:
        return f"{what}: no row with both hod and a peer timed"
    low, peer, row = min(ratios, key=lambda t: t[0])
    med = statistics.median(t[0] for t in ratios)
    return (f"over the {len(ratios)} {what} rows with a time for hod and a peer, hod's median "
            f"speedup against the fastest peer setting is {fmt_ratio(med)}x; the lowest is "
            f"{fmt_ratio(low)}x ({row['label']}: hod {time_ms(row, HOD):.3f} ms, {peer} "
            f"{time_ms(row, peer):.3f} ms)")


def check_facts(run: Run) -> tuple[int, float, str, Counter[str]]:
    """Checked results, their largest relative error and where, and the other statuses."""
    checked, worst, where = 0, 0.0, "-"
    statuses: Counter[str] = Counter()
    for sweep in run["sweeps"]:
        for row in sweep["rows"]:
            for name, result in row["engines"].items():
                err = result.get("check_rel_err")
                if result["status"] == OK and err is not None:
                    checked += 1
                    if err >= worst:
                        worst, where = err, f"{name}, {row['label']}"
                elif result["status"] != OK:
                    statuses[result["status"]] += 1
    return checked, worst, where, statuses


def headline(run: Run) -> str:
    """A few sentences computed from the run: machine, software, time, and the speedups."""
    m, s = run["machine"], run["settings"]
    kind = "quick run (--quick)" if s.get("quick") else "full run"
    cores = m.get("physical_cores")
    machine = (f"{m.get('cpu_model') or m.get('processor', '?')}, "
               f"{m.get('logical_cores', '?')} logical cores"
               + (f" ({cores} physical)" if cores else ""))
    out = [f"One {kind} on {machine}, device {m.get('device', 'cpu')}: torch {m['torch']}, "
           f"Python {m['python']}, {m['torch_threads']} torch thread(s), "
           f"{run.get('elapsed_s', float('nan')):.0f} s in all, git commit "
           f"{m.get('git_commit') or '?'}."]
    for what, orders in (("Jacobian", (1,)), ("Hessian", (2,)), ("order-3/4", (3, 4))):
        rows = _rows_of(run, orders)
        if rows:
            text = _extreme(rows, what)
            out.append(text[0].upper() + text[1:] + ".")
    checked, worst, where, statuses = check_facts(run)
    if checked:
        others = ", ".join(f"{n} {status}" for status, n in statuses.most_common())
        out.append(f"{checked} engine results were checked against torch.func in float64, "
                   f"block by block; the largest relative error among those that passed is "
                   f"{worst:.1e} ({where})"
                   + (f"; not timed or not counted: {others}." if others else "."))
    return " ".join(out)


# --- plot ------------------------------------------------------------------------------------

def plot_summary(run: Run, png: Path) -> None:
    """One panel per sweep: median ms per row of hod, hod.compile and each peer's best setting
    (log scale), saved as ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = derivative_sweeps(run)
    engines = engines_of({"sweeps": sweeps})
    lines = [e for e in engines if is_hod(e)] + peers_of(engines)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {name: (colours[i % len(colours)], "osD^v<>"[i % 7]) for i, name in enumerate(lines)}
    cols = min(4, len(sweeps))
    nrows = math.ceil(len(sweeps) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.3 * nrows + 0.8), squeeze=False)
    for ax, sweep in zip(axes.flat, sweeps, strict=False):
        rows = sweep["rows"]
        numeric = all(isinstance(r["x"], int) for r in rows)
        xs = [r["x"] if numeric else i for i, r in enumerate(rows)]
        for name in lines:
            pts = [(x, t) for x, row in zip(xs, rows, strict=True)
                   if (t := (time_ms(row, name) if is_hod(name) else
                             (b[0] if (b := best_setting(row, name)) else None))) is not None]
            if pts:
                colour, marker = style[name]
                ax.plot(*zip(*pts, strict=True), color=colour, marker=marker, ms=3,
                        linestyle="-" if numeric else "none", label=name)
        ax.set_yscale("log")
        ax.set_title(SWEEP_TITLES.get(sweep["name"], sweep["name"]), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        if numeric:
            ax.set_xlabel(sweep["x_name"], fontsize=8)
        else:
            ax.set_xticks(xs)
            ax.set_xticklabels([str(r["x"]).replace("relu_softmax", "relu") for r in rows],
                               rotation=60, ha="right", fontsize=5)
    for ax in list(axes.flat)[len(sweeps):]:
        ax.set_visible(False)
    for ax in axes.flat[::cols]:
        ax.set_ylabel("median ms", fontsize=8)
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels(),
                                                            strict=True)}
    several = {p for p in peers_of(engines) if sum(peer_of(e) == p for e in engines) > 1}
    fig.legend(list(handles.values()), [f"{n} (best setting)" if n in several else n
                                        for n in handles], loc="upper center",
               ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.3 * nrows + 0.8)))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tables",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path,
                        help=f"result JSON (default: the newest full run in {DEFAULT_FOLDER})")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--summary", action="store_true", help="the summary table (default)")
    what.add_argument("--sweeps", action="store_true", help="one table per sweep")
    what.add_argument("--headline", action="store_true", help="the headline sentences")
    parser.add_argument("--png", type=Path, help="also write the summary plot here")
    args = parser.parse_args(argv)
    path = args.run or latest_run()
    run = load_run(path)
    if args.sweeps:
        print(sweep_tables(run))
    elif args.headline:
        print(headline(run))
    else:
        print(summary_table(run))
    if args.png:
        plot_summary(run, args.png)


if __name__ == "__main__":
    main()
