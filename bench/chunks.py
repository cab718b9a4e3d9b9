"""The ``chunks`` sweep (issue #20): ``chunk_size=`` and ``group=`` of hod's transforms. Run
it with ``python -m bench.run --sweeps chunks``; rows in :mod:`bench.chunks_rows`.

Two parts, each one row of the result file:

* **memory**: a wide tanh net's input Hessian, whose intermediates are much larger than the
  result, by ``hod.hessian(f)`` and ``hod.hessian(f, chunk_size=c)`` for a few ``c``. Each
  setting's first call is checked against ``torch.func.hessian`` in float64 (a wrong setting
  is not timed), then the settings are timed interleaved (:func:`bench.timing.interleaved`).
  Peak memory: each setting alone in a fresh child (``python -m bench.chunks --child``,
  :func:`child_peak`), its peak RSS (``VmHWM``, :func:`bench.chunks_rows.peak_rss_mib`) above
  a baseline child that builds the inputs, imports hod and computes nothing. The table gives
  each chunked peak over the unchunked one (the issue's target: <= 0.6).
* **distributed**: the parameter Hessian of a 5,000-parameter MLP loss, one launch of
  ``python -m torch.distributed.run --standalone --nproc_per_node N -m bench.chunks --rank
  ...`` per setting (gloo, on the CPU; :func:`bench.chunks_rows.rank_main`): plain hod and
  ``torch.func.hessian`` on one process, hod with ``group=WORLD`` (and a ``chunk_size``) on 2
  and 4. Per setting: the median over the timed calls of the slowest rank's time, each rank's
  peak RSS above its own peak before the first call, and the share of the result each rank
  holds (the issue's target with 2 ranks: <= 0.6). Rank 0's ``full_tensor()`` is checked
  after the calls (the gathered whole would count in its peak before them) against
  ``torch.func.hessian`` in float64 and against the 1-process hod result; a wrong setting
  keeps no time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.chunks_rows import (
    HOD,
    RESULT_FILE,
    TORCH_FUNC,
    DistributedRow,
    MemoryRow,
    chunk_of,
    distributed_seed,
    memory_child,
    memory_seed,
    mlp_loss,
    rank_main,
    wide_net,
)
from bench.compare import Blocks, block_error, compare_blocks
from bench.engines import REPO_ROOT, failure_kind
from bench.memory import BASELINE, CALLS
from bench.runner import OK, WRONG
from bench.tables import CHUNKS, sweep_tables
from bench.timing import RepPolicy, call_timer, interleaved, median_ms

TITLE = ("chunk_size= and group=: peak memory by chunk, and a 5,000-parameter Hessian on "
         "1, 2 and 4 processes")
#: The memory row: intermediates (500, 40000) against a (500, 500) result.
MEMORY_ROW = MemoryRow(500, 40_000, (250, 100, 50))
QUICK_MEMORY_ROW = MemoryRow(300, 20_000, (100,))
#: The MLP of the distributed rows: 20-69-50-1 has 5,000 parameters.
MLP, QUICK_MLP, SAMPLES = (20, 69, 50), (8, 24, 16), 128
#: The chunk size of the chunked distributed settings.
DISTRIBUTED_CHUNK = 250
#: Timed calls per distributed setting (after the warm-up).
DISTRIBUTED_CALLS, QUICK_DISTRIBUTED_CALLS = 5, 2
#: Seconds a child or a launch may take.
TIMEOUT_S = 600.0


def distributed_rows(quick: bool) -> list[DistributedRow]:
    """Plain hod, torch.func and chunked hod on one process; hod with ``group=WORLD`` on 2
    (without and with a chunk) and 4 processes. ``--quick``: a smaller MLP, plain hod on
    one process and the chunked group on two."""
    if quick:
        return [DistributedRow(QUICK_MLP, SAMPLES, 1),
                DistributedRow(QUICK_MLP, SAMPLES, 2, chunk_size=DISTRIBUTED_CHUNK, group=True)]
    return [
        DistributedRow(MLP, SAMPLES, 1), DistributedRow(MLP, SAMPLES, 1, TORCH_FUNC),
        DistributedRow(MLP, SAMPLES, 1, chunk_size=DISTRIBUTED_CHUNK),
        DistributedRow(MLP, SAMPLES, 2, group=True),
        *(DistributedRow(MLP, SAMPLES, p, chunk_size=DISTRIBUTED_CHUNK, group=True)
          for p in (2, 4)),
    ]


def checked(result: dict[str, Any], got: Tensor, ref: Blocks) -> None:
    """Record in ``result`` the check of ``got`` (the Hessian) against ``ref``."""
    check = compare_blocks({(0, 0): got}, ref)
    result.update(status=OK if check.ok else WRONG, check=check.summary(),
                  check_rel_err=check.max_rel_err)


def result_entry() -> dict[str, Any]:
    return {"status": "", "median_ms": None, "times_ms": [], "warmup_ms": None, "detail": "",
            "check_rel_err": None, "check": ""}


def float64_reference(f: Callable[[Tensor], Tensor], x: Tensor) -> Blocks:
    return {(0, 0): torch.func.hessian(f)(x).detach()}


# --- memory --------------------------------------------------------------------------------

def run_memory_row(row: MemoryRow, policy: RepPolicy, log: Callable[[str], None]) -> dict:
    """Check, time and measure each of the row's settings (module docstring)."""
    start = time.perf_counter()
    import hod

    seed = memory_seed(row)
    ref = float64_reference(*wide_net(row, seed, torch.float64))
    f, x = wide_net(row, seed)
    results: dict[str, dict[str, Any]] = {}
    callers: dict[str, Callable[[], float]] = {}
    for setting in row.settings():
        result = results[setting] = result_entry()
        try:
            fn = hod.hessian(f, chunk_size=chunk_of(setting))
            began = time.perf_counter()
            got = fn(x)
            result["warmup_ms"] = 1e3 * (time.perf_counter() - began)
            checked(result, got, ref)
            lowered = fn.lower(x)
            result["chunks"] = getattr(lowered, "chunks", 1)
            result["width"] = getattr(lowered, "width", row.inputs) or row.inputs
        except Exception as exc:
            result.update(status=failure_kind(exc), detail=f"{type(exc).__name__}: {exc}"[:300])
            continue
        if result["status"] == OK:
            callers[setting] = call_timer(fn, x)
    del ref

    def on_error(name: str, exc: BaseException) -> None:
        results[name].update(status=failure_kind(exc), detail=f"{type(exc).__name__}: {exc}")

    for name, samples in interleaved(callers, policy, on_error=on_error).items():
        results[name].update(times_ms=[1e3 * s for s in samples], median_ms=median_ms(samples))
    peaks = {name: child_peak(name, row, log) for name in (BASELINE, *row.settings())}
    baseline_mib = peaks[BASELINE].get("peak_mib")
    for name, result in results.items():
        peak = peaks[name].get("peak_mib")
        result.update(peak_mib=peak, memory_status=peaks[name]["status"],
                      memory_detail=peaks[name].get("detail", ""),
                      above_baseline_mib=None if peak is None or baseline_mib is None
                      else peak - baseline_mib)
    return {"x": row.label(), "label": row.label(), "part": "memory", "case": row.to_dict(),
            "reference": "torch.func.hessian in float64 on the same weights and x",
            "baseline_mib": baseline_mib, "seconds": round(time.perf_counter() - start, 2),
            "engines": results}


def child_peak(setting: str, row: MemoryRow, log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``setting`` (or the baseline) alone in a fresh child, ``python -m bench.chunks
    --child`` (:func:`bench.chunks_rows.memory_child`); its report, with its peak RSS."""
    log(f"  chunks: peak memory of {setting} ...")
    command = [sys.executable, "-m", "bench.chunks", "--child", setting,
               "--case", json.dumps(row.to_dict()), "--threads", str(torch.get_num_threads())]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "TIMEOUT", "detail": f"killed after {TIMEOUT_S:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-2:])
        return {"status": "ERROR", "detail": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


# --- distributed ---------------------------------------------------------------------------

def launch(row: DistributedRow, calls: int, threads: int,
           timeout_s: float = TIMEOUT_S) -> tuple[list[dict[str, Any]], Tensor | None, str]:
    """Run ``row`` under torchrun: every rank's report, rank 0's whole result, and what went
    wrong (empty when nothing did)."""
    with tempfile.TemporaryDirectory(prefix="hod-chunks-") as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={row.processes}", "-m", "bench.chunks",
                   "--rank", json.dumps(row.to_dict()), "--calls", str(calls),
                   "--out", tmp, "--threads", str(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads))}
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return [], None, f"killed after {timeout_s:.0f} s"
        reports = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))]
        whole = Path(tmp) / RESULT_FILE
        result = torch.load(whole) if whole.is_file() else None
    problems = [f"rank {r['rank']}: {r['error']}" for r in reports if "error" in r]
    if proc.returncode != 0 and not problems:
        problems.append(f"exit {proc.returncode}: "
                        + " | ".join(err.strip().splitlines()[-3:]))
    if not problems and (len(reports) != row.processes or result is None):
        problems.append(f"{len(reports)} of {row.processes} rank reports, result "
                        f"{'missing' if result is None else 'saved'}")
    return reports, result, "; ".join(problems)


def distributed_entry(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's figures from its ranks' reports: per call the slowest rank's time."""
    per_call = [max(times) for times in zip(*(r["times_ms"] for r in reports), strict=True)]
    peaks = [r["peak_above_baseline_mib"] for r in reports]
    shares = [r["share"] for r in reports]
    return {
        "times_ms": per_call, "median_ms": median_ms([t / 1e3 for t in per_call]),
        "warmup_ms": max(r["warmup_ms"] for r in reports),
        "peak_above_baseline_mib": max(peaks), "rank_peaks_mib": peaks,
        "share": max(shares), "rank_shares": shares, "result_type": reports[0]["type"],
        "local_shapes": [r["local_shape"] for r in reports],
    }


def run_distributed_rows(rows: list[DistributedRow], calls: int, threads: int,
                         log: Callable[[str], None]) -> dict:
    """Launch, check and measure each setting; the first row (plain hod, one process) is
    the single-process result the others are also compared with."""
    start = time.perf_counter()
    first = rows[0]
    f64, theta64 = mlp_loss(first.sizes, first.samples, distributed_seed(first), torch.float64)
    ref = float64_reference(f64, theta64)
    single: Tensor | None = None
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        log(f"  chunks: {row.label()} ...")
        result = results[row.label()] = {**result_entry(), "processes": row.processes}
        reports, got, problem = launch(row, calls, threads)
        if problem:
            result.update(status="ERROR", detail=problem[:300])
            continue
        result.update(distributed_entry(reports))
        checked(result, got, ref)
        if single is None:
            single = got
        rel, _ = block_error(got.double(), single.double(), 0.0)
        result["vs_single_rel"] = rel
        if result["status"] != OK:
            result.update(median_ms=None, times_ms=[])
    return {"x": first.problem_label(), "label": first.problem_label(), "part": "distributed",
            "case": first.to_dict(), "seconds": round(time.perf_counter() - start, 2),
            "reference": "rank 0's full_tensor() against torch.func.hessian in float64 at "
                         "the same size, after the timed calls",
            "engines": results}


# --- the sweep -----------------------------------------------------------------------------

def notes(quick: bool, threads: int) -> list[str]:
    cores = os.cpu_count() or 1
    most = max(r.processes for r in distributed_rows(quick))
    lines = [
        "memory: hod.hessian(f) and hod.hessian(f, chunk_size=c); peak: each setting alone in "
        f"a fresh child making {CALLS} calls, its peak RSS (VmHWM) above a baseline child that "
        "builds the inputs and imports hod; ratio: a chunked peak over the unchunked one",
        "distributed: one launch of python -m torch.distributed.run --standalone "
        "--nproc_per_node N per setting, gloo on the CPU, "
        f"{threads or 'default'} torch thread(s) per process; time: per call the slowest "
        "rank's, the call between two barriers, median over the calls after a warm-up; peak: "
        "a rank's peak RSS (VmHWM) after the calls above its own before the first call (inputs "
        "built, process group up), the largest over the ranks; share: a rank's to_local() entries "
        "over the whole result's, the largest over the ranks",
    ]
    if most * max(1, threads) > cores:
        lines.append(f"this machine has {cores} cores: {most} processes of "
                     f"{max(1, threads)} thread(s) oversubscribe them, so the {most}-process "
                     "times measure contention for the cores, not scaling; read the peak and "
                     "share columns there")
    return lines


def run_chunks_sweep(
    policy: RepPolicy, quick: bool = False, threads: int = 1, log: Callable[[str], None] = print,
    memory_row: MemoryRow | None = None, rows: list[DistributedRow] | None = None,
    calls: int | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Both parts (the module docstring; smaller rows given ``memory_row``, ``rows`` and
    ``calls``): the sweep in the result file's form, and the engines' versions."""
    import hod

    memory_row = memory_row or (QUICK_MEMORY_ROW if quick else MEMORY_ROW)
    rows = rows or distributed_rows(quick)
    calls = calls or (QUICK_DISTRIBUTED_CALLS if quick else DISTRIBUTED_CALLS)
    log(f"  chunks: {memory_row.label()} ...")
    parts = [run_memory_row(memory_row, policy, log),
             run_distributed_rows(rows, calls, threads, log)]
    versions = {HOD: f"hod {getattr(hod, '__version__', '?')} from {hod.__file__}",
                TORCH_FUNC: f"torch {torch.__version__}"}
    return {"name": CHUNKS, "title": TITLE, "x_name": "row", "kind": CHUNKS,
            "notes": notes(quick, threads), "rows": parts}, versions


def format_chunks(sweep: dict[str, Any]) -> str:
    """The sweep's tables (:func:`bench.tables.chunks_grids`) with the notes, in Markdown."""
    return sweep_tables({"sweeps": [sweep]})


def list_rows() -> str:
    """The rows, for ``python -m bench.run --list``."""
    lines = [f"{CHUNKS:15s} {TITLE}", f"{'':15s} {MEMORY_ROW.label()}: "
             f"{', '.join(MEMORY_ROW.settings())} (--quick: {QUICK_MEMORY_ROW.label()})"]
    lines.append(f"{'':15s} {distributed_rows(False)[0].problem_label()}:")
    lines += [f"{'':15s}   {r.label()}" for r in distributed_rows(False)]
    lines.append(f"{'':15s} --quick: {'; '.join(r.label() for r in distributed_rows(True))}, "
                 f"{DistributedRow(QUICK_MLP, SAMPLES, 1).parameters()} parameters")
    return "\n".join(lines)


# --- the children ----------------------------------------------------------------------------

def main() -> None:
    """A memory child (``--child``, :func:`bench.memory.main`) or a rank (``--rank``)."""
    if "--rank" not in sys.argv:
        from bench.memory import main as memory_main

        memory_main(memory_child, MemoryRow.from_dict)
        return
    parser = argparse.ArgumentParser(description="a rank of the chunks sweep (under torchrun)")
    parser.add_argument("--rank", required=True, help="DistributedRow as JSON")
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rank_main(DistributedRow.from_dict(json.loads(args.rank)), args.calls, args.out)
    # The report is written; torch 2.13's interpreter exit after a gloo group sometimes
    # aborts ("terminate called without an active exception"), so skip that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
