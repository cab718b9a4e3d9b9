"""Reporting: text tables, the JSON result file and the PNG plots."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.models import Sweep
from bench.runner import OK, RowResult
from bench.tables import problem_notes, summary_grid, sweep_grid


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, object]:
    """Facts about the machine and software that produced the numbers."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
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


def sweep_dict(sweep: Sweep, rows: Sequence[RowResult]) -> dict[str, object]:
    """A sweep and its rows in the result file's form (what :mod:`bench.tables` reads)."""
    return {"name": sweep.name, "title": sweep.title, "x_name": sweep.x_name,
            "notes": list(sweep.notes), "rows": [r.to_dict() for r in rows]}


def format_table(sweep: Sweep, rows: Sequence[RowResult]) -> str:
    """A fixed-width table of medians (ms) of every engine setting, hod's speedup over the
    fastest peer setting and over each peer's best one (:func:`bench.tables.sweep_grid`), and
    under it the status notes."""
    if not rows:
        return f"== {sweep.name}: no rows =="
    data = sweep_dict(sweep, rows)
    out = [f"== {sweep.name}: {sweep.title} (median ms) =="]
    out += render_table(sweep_grid(data))
    out += [f"   note: {n}" for n in sweep.notes]
    out += [f"   {n}" for n in problem_notes(data)]
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


def check_summary(rows: Sequence[RowResult]) -> list[str]:
    """Per engine, the largest relative error of its passed checks over these rows."""
    lines = []
    engines = list(rows[0].engines) if rows else []
    for name in engines:
        checked = [(r.engines[name].check_rel_err, r.x) for r in rows
                   if r.engines[name].status == OK and r.engines[name].check_rel_err is not None]
        if checked:
            err, x = max(checked, key=lambda c: c[0] or 0.0)
            lines.append(f"   check {name}: {len(checked)} rows passed, largest relative error "
                         f"{err:.1e} (at {x})")
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
    """Per sweep, hod's speedup over the fastest peer setting and over each peer's best one
    (min / median / max over the rows, :func:`bench.tables.summary_grid`), fixed-width."""
    run = {"sweeps": [sweep_dict(sweep, rows) for sweep, rows in results]}
    return "\n".join(render_table(summary_grid(run)))
