"""Reporting: text tables, the JSON result file and the PNG plots."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.models import Sweep
from bench.runner import OK, RowResult

HOD = "hod"
SHORT_NAMES = {"autograd.functional": "autograd.F"}


def short(name: str) -> str:
    """Column title of an engine."""
    return SHORT_NAMES.get(name, name)


def machine_info(device: str) -> dict[str, object]:
    """Facts about the machine and software that produced the numbers."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "logical_cores": os.cpu_count(),
        "device": device,
    }
    if os.environ.get("GLIBC_TUNABLES"):  # allocator settings move CPU timings a lot
        info["glibc_tunables"] = os.environ["GLIBC_TUNABLES"]
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    info["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    return info


def _cell(row: RowResult, engine: str) -> str:
    result = row.engines[engine]
    return f"{result.median_ms:.3f}" if result.median_ms is not None else result.status


def is_hod(engine: str) -> bool:
    """Whether ``engine`` is hod itself (``hod``) or a variant of it (``hod.compile``)."""
    return engine == HOD or engine.startswith(HOD + ".")


def _ratio(row: RowResult, peer: str, hod: str = HOD) -> float | None:
    """How many times faster ``hod`` is than ``peer`` on this row (None if either lacks a
    time)."""
    ours, other = row.engines.get(hod), row.engines.get(peer)
    if ours is None or other is None or ours.median_ms is None or other.median_ms is None:
        return None
    return other.median_ms / ours.median_ms


def speedups(
    row: RowResult, peers: Sequence[str], hod: str = HOD
) -> tuple[float | None, str | None]:
    """``hod``'s speedup over the fastest peer that has a time on this row, and that peer."""
    timed = [p for p in peers if row.engines[p].median_ms is not None]
    if not timed:
        return None, None
    best = min(timed, key=lambda p: row.engines[p].median_ms or math.inf)
    return _ratio(row, best, hod), best


def _timed_hods(engines: Sequence[str], rows: Sequence[RowResult]) -> list[str]:
    return [
        e for e in engines if is_hod(e) and any(r.engines[e].median_ms is not None for r in rows)
    ]


def format_table(sweep: Sweep, rows: Sequence[RowResult]) -> str:
    """A fixed-width table of medians (ms) and, per hod engine that ran, its speedup over
    the best peer; hod's over each peer too."""
    if not rows:
        return f"== {sweep.name}: no rows =="
    engines = list(rows[0].engines)
    peers = [e for e in engines if not is_hod(e)]
    hods = _timed_hods(engines, rows)
    header = [sweep.x_name] + [short(e) for e in engines]
    header += [f"{h} vs best" for h in hods]
    if HOD in hods:
        header += [f"vs {short(p)}" for p in peers]
    lines = []
    for row in rows:
        cells = [str(row.x)] + [_cell(row, e) for e in engines]
        for hod in hods:
            best_ratio, best = speedups(row, peers, hod)
            cells.append(f"{best_ratio:.2f}x ({short(best)})" if best_ratio and best else "-")
        if HOD in hods:
            cells += [f"{r:.2f}x" if (r := _ratio(row, p)) else "-" for p in peers]
        lines.append(cells)
    out = [f"== {sweep.name}: {sweep.title} (median ms) =="]
    out += render_table([header, *lines])
    out += [f"   note: {n}" for n in sweep.notes]
    out += _problem_notes(rows)
    return "\n".join(out)


def render_table(table: list[list[str]]) -> list[str]:
    """Align a table: first column left, the others right."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])
        lines.append("  ".join(cells))
    return lines


def _problem_notes(rows: Sequence[RowResult]) -> list[str]:
    """One line per engine status other than ok (first occurrence), with its detail."""
    seen: set[tuple[str, str]] = set()
    notes = []
    for row in rows:
        for name, result in row.engines.items():
            key = (name, result.status)
            if result.status != OK and key not in seen:
                seen.add(key)
                notes.append(f"   {name}: {result.status} from {row.x}: {result.detail}")
    return notes


def check_summary(rows: Sequence[RowResult]) -> list[str]:
    """Per engine, what the correctness check compared across these rows."""
    lines = []
    engines = list(rows[0].engines) if rows else []
    for name in engines:
        details = [r.engines[name].detail for r in rows if r.engines[name].status == OK]
        if details:
            lines.append(f"   check {name} (last ok row): {details[-1]}")
    return lines


def write_json(path: Path, payload: dict[str, object]) -> None:
    """Write the result file (rewritten after each sweep, so a partial run leaves results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def engine_styles(engines: Sequence[str]) -> dict[str, dict[str, str]]:
    """A colour and marker per engine, so that each engine looks the same in every panel."""
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {
        name: {"color": colours[i % len(colours)], "marker": "osD^v<>"[i % 7]}
        for i, name in enumerate(engines)
    }


def draw_panel(
    ax: Any, sweep: Sweep, rows: Sequence[RowResult], style: dict[str, dict[str, str]]
) -> None:
    """Draw one sweep on ``ax``: median time vs swept size, log y, one line per engine.

    Sweeps whose rows are not one numeric size (the order-3/4 ones) are drawn as points over
    the row labels.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positions = [r.x for r in rows] if sweep.numeric_x else list(range(len(rows)))
    for name in style:
        pts = [(x, r.engines[name].median_ms) for x, r in zip(positions, rows, strict=True)
               if r.engines[name].median_ms is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            line = "-" if sweep.numeric_x else "none"
            ax.plot(xs, ys, linestyle=line, ms=4, label=name, **style[name])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(sweep.title, fontsize=8)
    ax.set_ylabel("median ms", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.3)
    if sweep.numeric_x:
        ax.set_xlabel(sweep.x_name, fontsize=8)
    else:
        ax.set_xticks(positions)
        ax.set_xticklabels([str(r.x) for r in rows], rotation=50, ha="right", fontsize=6)


def plot(path: Path, results: Sequence[tuple[Sweep, Sequence[RowResult]]], title: str) -> None:
    """One panel per sweep (see :func:`draw_panel`), saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    height = 3.6 * nrows + 0.9
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, height), squeeze=False)
    engines = list(results[0][1][0].engines) if results and results[0][1] else []
    style = engine_styles(engines)
    for ax, (sweep, rows) in zip(axes.flat, results, strict=False):
        draw_panel(ax, sweep, rows, style)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    legend: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=max(1, len(legend)),
               fontsize=9, bbox_to_anchor=(0.5, 1 - 0.35 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.85 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweep: Sweep, rows: Sequence[RowResult]) -> Any:
    """One sweep in its own pyplot figure (for notebooks); returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    draw_panel(ax, sweep, rows, engine_styles(list(rows[0].engines) if rows else []))
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def speedup_summary(results: Sequence[tuple[Sweep, Sequence[RowResult]]]) -> str:
    """Per sweep and hod engine, its speedup over the fastest peer of each row: min / median /
    max over the rows where both have a time, and which engines were left without a time on
    how many rows."""
    table = [["sweep", "rows", "engine", "vs best: min", "median", "max", "not timed"]]
    for sweep, rows in results:
        engines = list(rows[0].engines) if rows else []
        peers = [e for e in engines if not is_hod(e)]
        for hod in _timed_hods(engines, rows) or [HOD]:
            ratios = sorted(
                r for row in rows if (r := speedups(row, peers, hod)[0]) is not None
            )
            spread = (ratios[0], statistics.median(ratios), ratios[-1]) if ratios else ()
            cells = [f"{r:.2f}x" for r in spread] or ["-"] * 3
            table.append([sweep.name, str(len(rows)), hod, *cells, _not_timed(rows, engines)])
    return "\n".join(render_table(table))


def _not_timed(rows: Sequence[RowResult], engines: Sequence[str]) -> str:
    """E.g. ``thoad WRONG 3`` for the engines and statuses that left rows without a time."""
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        for name in engines:
            status = row.engines[name].status
            if row.engines[name].median_ms is None:
                counts[name, status] = counts.get((name, status), 0) + 1
    return ", ".join(f"{short(n)} {s} {c}" for (n, s), c in counts.items()) or "-"
