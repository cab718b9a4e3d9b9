"""Peak-memory mode: each engine alone in a fresh child process on one row.

The parent starts ``python -m bench.memory --child ENGINE ...`` per engine (the thoad one
under the thoad environment's interpreter); the child reports its own peak resident set size
(``VmHWM``, :func:`peak_rss_mib`; the parent's ``os.wait4`` ``ru_maxrss`` remains the
fallback for a child that dies, though it starts from the parent's size at the fork). A
``baseline`` child per interpreter builds the inputs and computes nothing, so the table can
show each engine's peak above the baseline of its own interpreter (the thoad environment's
torch is the CUDA build of PyPI, whose libraries alone make its baseline larger). The child
makes the warm-up call and two more; it prints a JSON line with its call times and, on CUDA,
torch's peak allocated memory. The result is not checked here (the sweeps do that).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.models import Case
from bench.runner import row_seed

BASELINE = "baseline"
CALLS = 3


@dataclass
class MemoryResult:
    """Peak RSS of one child."""

    engine: str
    interpreter: str
    status: str
    max_rss_mib: float | None
    above_baseline_mib: float | None = None
    cuda_peak_mib: float | None = None
    call_ms: list[float] | None = None
    detail: str = ""


def peak_rss_mib() -> float:
    """This process's peak resident set size so far: ``VmHWM`` of ``/proc/self/status``
    (Linux), the high-water mark of the process's own address space. Not ``ru_maxrss``:
    Linux carries the parent's resident size at the fork into a child's ``ru_maxrss``
    (through exec), so a child started by a large parent reads the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _child_command(python: Path | str, engine: str, case: Case, device: str,
                   module: str = "bench.memory") -> list[str]:
    return [str(python), "-m", module, "--child", engine,
            "--case", json.dumps(case.to_dict()), "--device", device,
            "--threads", str(torch.get_num_threads())]


def _wait_with_usage(pid: int, timeout_s: float) -> tuple[resource.struct_rusage, int | None]:
    """Reap ``pid`` with its own resource usage; kill it after ``timeout_s`` (exit code None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return usage, os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _, _, usage = os.wait4(pid, 0)
    return usage, None


def run_child(python: Path | str, engine: str, case: Case, device: str, timeout_s: float,
              interpreter: str, module: str = "bench.memory") -> MemoryResult:
    """Run one child (``python -m module --child engine ...``) to completion and return its
    peak RSS (ru_maxrss is KiB on Linux)."""
    from bench.engines import REPO_ROOT

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(_child_command(python, engine, case, device, module),
                                cwd=REPO_ROOT, stdout=out, stderr=err, text=True)
        usage, exit_code = _wait_with_usage(proc.pid, timeout_s)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    proc.returncode = exit_code  # reaped by os.wait4: keep Popen from waiting again
    rss = usage.ru_maxrss / 1024
    if exit_code is None:
        return MemoryResult(engine, interpreter, "TIMEOUT", rss,
                            detail=f"killed after {timeout_s:.0f} s")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if exit_code != 0 or not lines:
        tail = " | ".join(stderr.strip().splitlines()[-2:])
        return MemoryResult(engine, interpreter, "ERROR", rss, detail=f"exit {exit_code}: {tail}")
    report = json.loads(lines[-1])
    rss = report.get("peak_mib", rss)  # the child's own peak (see peak_rss_mib)
    return MemoryResult(engine, interpreter, report["status"], rss,
                        cuda_peak_mib=report.get("cuda_peak_mib"),
                        call_ms=report.get("call_ms"), detail=report.get("detail", ""))


def measure(engine_names: list[str], case: Case, device: str, timeout_s: float,
            log: Callable[[str], None] = print, module: str = "bench.memory",
            env_engines: tuple[str, ...] = ("thoad",),
            env_label: str = "thoad env") -> list[MemoryResult]:
    """Peak RSS of a baseline and of each engine, each alone in a child process
    (``python -m module --child``); ``env_engines`` run under the Python 3.12 environment."""
    from bench.engines import THOAD_SETUP_HINT, thoad_python

    plans: list[tuple[str, str, Path | str]] = [(BASELINE, "project", sys.executable)]
    plans += [(name, "project", sys.executable) for name in engine_names
              if name not in env_engines]
    results: list[MemoryResult] = []
    in_env = [name for name in engine_names if name in env_engines]
    if in_env:
        if thoad_python().exists():
            plans += [(name, env_label, thoad_python()) for name in (BASELINE, *in_env)]
        else:
            missing = f"no {env_label} at {thoad_python()}; {THOAD_SETUP_HINT}"
            results += [MemoryResult(name, env_label, "absent", None, detail=missing)
                        for name in in_env]
    baselines: dict[str, float] = {}
    for engine, interpreter, python in plans:
        log(f"  memory: {engine} ({interpreter}) on {case.label()} ...")
        result = run_child(python, engine, case, device, timeout_s, interpreter, module)
        if engine == BASELINE and result.max_rss_mib is not None:
            baselines[interpreter] = result.max_rss_mib
        elif result.max_rss_mib is not None and interpreter in baselines:
            result.above_baseline_mib = result.max_rss_mib - baselines[interpreter]
        results.append(result)
    return results


def format_memory(case: Case, results: list[MemoryResult]) -> str:
    """Text table of the memory results."""
    from bench.report import render_table

    header = ["engine", "interpreter", "status", "max RSS MiB", "above baseline", "cuda peak MiB",
              "median of 3 calls ms"]
    rows = [header]
    for r in results:
        median = statistics.median(r.call_ms) if r.call_ms else None
        rows.append([
            r.engine, r.interpreter, r.status,
            f"{r.max_rss_mib:.0f}" if r.max_rss_mib is not None else "-",
            f"{r.above_baseline_mib:+.0f}" if r.above_baseline_mib is not None else "-",
            f"{r.cuda_peak_mib:.0f}" if r.cuda_peak_mib is not None else "-",
            f"{median:.1f}" if median is not None else "-",
        ])
    lines = [f"== memory: peak RSS, each engine alone in a child process, on {case.label()} =="]
    lines += render_table(rows)
    lines += [f"   {r.engine}: {r.detail}" for r in results if r.detail and r.status != "ok"]
    return "\n".join(lines)


def _child_main(engine_name: str, case: Case, device: str) -> dict[str, object]:
    """Body of a child: build inputs, run the engine ``CALLS`` times (none for the baseline)."""
    from bench.models import make_inputs

    inputs = make_inputs(case, row_seed(case, 0), device)
    if engine_name == BASELINE:
        return {"status": "ok"}
    if engine_name == "thoad":
        from bench.thoad_worker import ThoadCase

        thoad_case = ThoadCase(case, inputs, device)
        calls = [thoad_case.call() for _ in range(CALLS)]
    else:
        from bench.engines import make_engines

        (engine,) = make_engines([engine_name], thoad_timeout_s=0)
        if (reason := engine.unavailable_reason()) is not None:
            return {"status": "absent", "detail": reason}
        if (reason := engine.unsupported_reason(case)) is not None:
            return {"status": "n/a", "detail": reason}
        runner = engine.prepare(case, inputs, device)
        calls = [runner.warmup().seconds] + [runner.time_call() for _ in range(CALLS - 1)]
    report: dict[str, object] = {"status": "ok", "call_ms": [1e3 * c for c in calls]}
    if device.startswith("cuda"):
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return report


def main(child_main: Callable[[str, Any, str], dict[str, object]] = _child_main,
         read_case: Callable[[dict[str, Any]], Any] = Case.from_dict) -> None:
    """A child's command line: ``child_main(engine, case, device)`` prints its report (another
    module's children pass their own, with how to read their ``--case``)."""
    parser = argparse.ArgumentParser(description="peak-memory child (used by bench.run --memory)")
    parser.add_argument("--child", required=True)
    parser.add_argument("--case", required=True, help="Case as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    case = read_case(json.loads(args.case))
    try:
        report = child_main(args.child, case, args.device)
    except Exception as exc:
        from bench.engines import failure_kind

        report = {"status": failure_kind(exc), "detail": f"{type(exc).__name__}: {exc}"[:300]}
    report["peak_mib"] = peak_rss_mib()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
