"""Benchmark hod against torch.func, torch.autograd.functional and thoad.

Run from the repository root::

    python -m bench.run --quick                 # a few rows of every sweep, a few minutes
    python -m bench.run                         # every row of the seed notebook's sweeps
    python -m bench.run --sweeps hess_all_width,o3_x --device cuda
    python -m bench.run --memory                # peak RSS per engine on the largest Hessian row
    python -m bench.run --sweeps taylor         # Taylor mode: hod, jet-for-pytorch, torch.func
    python -m bench.run --sweeps per-sample     # vmap(hod.hessian(f)) against vmap of torch.func
    python -m bench.run --sweeps zoo            # real models in float32 against the best peer
    python -m bench.run --sweeps chunks         # chunk_size= memory, group= over 1, 2, 4 processes
    python -m bench.run --sweeps sparse         # sparse=True against dense and hand colouring
    python -m bench.run --list                  # the sweeps and their rows

See bench/README.md for what is measured and how results are checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from bench.chunks import TITLE as CHUNKS_TITLE
from bench.chunks import format_chunks, run_chunks_sweep
from bench.chunks import list_rows as list_chunks_rows
from bench.compare import ATOL, RTOL
from bench.engines import DEFAULT_ENGINES, ENGINE_NAMES, PEERS, expand_engine_names, make_engines
from bench.memory import format_memory, measure
from bench.models import MEMORY_SWEEP, SWEEPS, Sweep
from bench.per_sample import TITLE as PER_SAMPLE_TITLE
from bench.per_sample import format_per_sample, run_per_sample_sweep
from bench.per_sample import list_rows as list_per_sample_rows
from bench.report import check_summary, format_table, machine_info, plot, sweep_dict, write_json
from bench.runner import HOPELESS, HOPELESS_MS, TRAILING, RowResult, RunSettings, SweepRunner
from bench.sparse import TITLE as SPARSE_TITLE
from bench.sparse import format_sparse, run_sparse_sweep
from bench.sparse import list_rows as list_sparse_rows
from bench.tables import CHUNKS, PER_SAMPLE, SPARSE, TAYLOR, ZOO
from bench.taylor import TITLE as TAYLOR_TITLE
from bench.taylor import format_taylor, list_rows, run_taylor_sweep
from bench.taylor_memory import format_taylor_memory, measure_taylor
from bench.timing import FULL_POLICY, QUICK_POLICY, RepPolicy
from bench.zoo import TITLE as ZOO_TITLE
from bench.zoo import format_zoo, run_zoo_sweep
from bench.zoo import list_rows as list_zoo_rows

DEFAULT_OUT = Path(__file__).resolve().parent / "results"  # git-ignored scratch
COMMITTED_OUT = Path(__file__).resolve().parent / "runs"  # runs quoted in README and docs
#: The sweeps with their own rows and engines, run by name only, on the CPU.
OWN_ENGINE_SWEEPS = {TAYLOR: TAYLOR_TITLE, PER_SAMPLE: PER_SAMPLE_TITLE, ZOO: ZOO_TITLE,
                     CHUNKS: CHUNKS_TITLE, SPARSE: SPARSE_TITLE}
#: How each of them prints its table.
OWN_ENGINE_FORMATS = {TAYLOR: format_taylor, PER_SAMPLE: format_per_sample, ZOO: format_zoo,
                      CHUNKS: format_chunks, SPARSE: format_sparse}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="a subset of each sweep's rows and fewer repetitions")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--sweeps", default="all",
                        help="comma-separated sweep names (see --list), default all but "
                             f"{', '.join(OWN_ENGINE_SWEEPS)} (their own engines: run them "
                             "by name)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help=f"comma-separated engines of {','.join(ENGINE_NAMES)}, or a "
                             f"peer's plain name ({', '.join(PEERS)}) for all its settings; "
                             f"default all but hod.compile")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory for the JSON and PNG results (default {DEFAULT_OUT}, "
                             f"git-ignored; runs quoted in the docs go to {COMMITTED_OUT})")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--memory", action="store_true",
                        help="instead of the sweeps, measure each engine's peak RSS alone in a "
                             f"child process on the largest {MEMORY_SWEEP} row (with --sweeps "
                             f"{TAYLOR}: on the taylor sweep's exact Laplacian and PINN rows)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per call above which an engine is skipped on the larger "
                             "rows of a sweep (default 20, 5 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the inputs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the harness, the thoad worker and the memory "
                             "children (default 1; 0 keeps torch's default of one per core)")
    parser.add_argument("--compile-sweeps", default="all",
                        help="comma-separated sweeps on which hod.compile runs when --engines "
                             "names it (default all; its warm-up compiles, seconds a row), e.g. "
                             "o3_x,o3_all,o4_x,o4_all")
    parser.add_argument("--taylor-compile", action="store_true",
                        help=f"add hod.compile and jet[collapsed+compile] to the {TAYLOR} sweep "
                             "(torch.compile in each warm-up: tens of seconds a row)")
    parser.add_argument("--list", action="store_true", help="list the sweeps and exit")
    return parser.parse_args(argv)


def select_sweeps(spec: str) -> list[Sweep]:
    """The sweeps named in ``spec`` (``all`` for every one), in definition order."""
    if spec == "all":
        return list(SWEEPS.values())
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in SWEEPS and n not in OWN_ENGINE_SWEEPS]
    if unknown:
        raise SystemExit(f"unknown sweeps {unknown}; known: {', '.join(SWEEPS)}, "
                         f"{', '.join(OWN_ENGINE_SWEEPS)}")
    return [SWEEPS[n] for n in names if n not in OWN_ENGINE_SWEEPS]


def engines_for(
    sweep: Sweep, args: argparse.Namespace, engine_names: list[str]
) -> list[str] | None:
    """The engines that run ``sweep`` (None: all): hod.compile only on ``--compile-sweeps``."""
    if args.compile_sweeps == "all" or sweep.name in {s.name for s in
                                                      select_sweeps(args.compile_sweeps)}:
        return None
    return [n for n in engine_names if n != "hod.compile"]


def list_sweeps() -> None:
    for sweep in SWEEPS.values():
        xs = [str(sweep.x_value(c)) for c in sweep.cases]
        quick = [xs[i] for i in sweep.quick]
        print(f"{sweep.name:15s} {sweep.title}\n{'':15s} rows: {', '.join(xs)}\n"
              f"{'':15s} --quick: {', '.join(quick)}")
    print(list_rows())
    print(list_per_sample_rows())
    print(list_zoo_rows())
    print(list_chunks_rows())
    print(list_sparse_rows())


def make_runner(
    engine_names: list[str],
    *,
    quick: bool,
    device: str = "cpu",
    budget: float | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> SweepRunner:
    """The engines and sweep runner of a run, with the defaults of the command line.

    ``quick`` picks the repetition policy and the default budget (5 s, else 20 s); the rows are
    picked per sweep by :meth:`SweepRunner.run_sweep`. Call ``shutdown()`` on each of the
    runner's engines when done (it stops the thoad worker).
    """
    policy = QUICK_POLICY if quick else FULL_POLICY
    budget = budget if budget is not None else (5.0 if quick else 20.0)
    engines = make_engines(engine_names, thoad_timeout_s=max(120.0, 6 * budget))
    settings = RunSettings(device=device, policy=policy, budget_s=budget, seed=seed)
    return SweepRunner(engines, settings, log)


def run_sweeps(args: argparse.Namespace, engine_names: list[str], out_stem: Path) -> None:
    if not select_sweeps(args.sweeps):  # the taylor sweep alone: none of these engines
        engine_names = []
    runner = make_runner(engine_names, quick=args.quick, device=args.device,
                         budget=args.budget, seed=args.seed)
    engines, policy, budget = runner.engines, runner.settings.policy, runner.settings.budget_s
    for name, reason in runner.absent.items():
        print(f"note: engine {name} is absent: {reason}")
    info = machine_info(args.device)
    info["engines"] = {e.name: runner.absent.get(e.name) or e.version() for e in engines}
    sweeps_json: list[dict[str, object]] = []
    payload: dict[str, object] = {
        "machine": info,
        "settings": {
            "quick": args.quick, "budget_s": budget, "policy": asdict(policy),
            "engines": engine_names, "seed": args.seed, "sweeps": args.sweeps,
            "compile_sweeps": args.compile_sweeps,
            "engine_settings": {e.name: {"peer": e.peer, "setting": e.setting,
                                         "call": e.describe()} for e in engines},
            "hopeless": {"factor": HOPELESS, "above_ms": HOPELESS_MS},
            "trailing": {"factor": TRAILING, "reps": policy.min_reps},
            "check": {
                "reference": "torch.func (jacrev in n-1 jacfwd) in float64 on the row's "
                             "inputs cast to float64",
                "tolerance": "per block: max|got - ref| <= rtol * max|ref_block| "
                             "+ atol * max|ref| (all blocks)",
                "rtol": RTOL, "atol": ATOL,
            },
        },
        "sweeps": sweeps_json,
    }
    done: list[tuple[Sweep, list[RowResult]]] = []
    json_path = out_stem.with_suffix(".json")
    start = time.perf_counter()
    try:
        for sweep in select_sweeps(args.sweeps):
            print(f"\n-- {sweep.name}: {sweep.title}", flush=True)
            rows = runner.run_sweep(sweep, args.quick, only=engines_for(sweep, args, engine_names))
            done.append((sweep, rows))
            print(format_table(sweep, rows))
            print("\n".join(check_summary(rows)), flush=True)
            sweeps_json.append(sweep_dict(sweep, rows))
            payload["elapsed_s"] = round(time.perf_counter() - start, 1)
            write_json(json_path, payload)
        for name, title in OWN_ENGINE_SWEEPS.items():
            if name not in args.sweeps.split(","):
                continue
            print(f"\n-- {name}: {title}", flush=True)
            if args.device != "cpu":
                print(f"note: the {name} sweep runs on the CPU only (not {args.device})")
            sweep, versions = run_own_engine_sweep(name, args, policy)
            info["engines"].update(versions)
            print(OWN_ENGINE_FORMATS[name](sweep))
            sweeps_json.append(sweep)
            payload["elapsed_s"] = round(time.perf_counter() - start, 1)
            write_json(json_path, payload)
    finally:
        for engine in engines:
            engine.shutdown()
    print(f"\nresults: {json_path} ({time.perf_counter() - start:.0f} s)")
    if done and not args.no_plots:
        png = out_stem.with_suffix(".png")
        plot(png, done, f"hod benchmark, {args.device}, torch {torch.__version__}, "
                        f"{torch.get_num_threads()} threads{' (quick)' if args.quick else ''}")
        print(f"plots:   {png}")


def run_own_engine_sweep(
    name: str, args: argparse.Namespace, policy: RepPolicy
) -> tuple[dict[str, object], dict[str, str]]:
    """One of :data:`OWN_ENGINE_SWEEPS` on the CPU: the sweep's part of the result file, and
    its engines' versions."""
    if name == TAYLOR:
        return run_taylor_sweep(policy, args.seed, 600.0, compiled=args.taylor_compile)
    if name == ZOO:
        return run_zoo_sweep(policy, args.seed, quick=args.quick)
    if name == CHUNKS:
        return run_chunks_sweep(policy, quick=args.quick, threads=args.threads)
    if name == SPARSE:
        return run_sparse_sweep(policy, quick=args.quick)
    return run_per_sample_sweep(policy, args.seed, quick=args.quick)


def run_taylor_memory(out_stem: Path) -> None:
    """``--memory --sweeps taylor``: the taylor engines' peak RSS (:mod:`bench.taylor_memory`)."""
    measured = measure_taylor(timeout_s=600.0)
    print(format_taylor_memory(measured))
    json_path = out_stem.with_name(out_stem.name + "-taylor-memory").with_suffix(".json")
    write_json(json_path, {"machine": machine_info("cpu"), "rows": [
        {"case": row.to_dict(), "memory": [asdict(r) for r in results]}
        for row, results in measured]})
    print(f"\nresults: {json_path}")


def run_memory(args: argparse.Namespace, engine_names: list[str], out_stem: Path) -> None:
    if TAYLOR in args.sweeps.split(","):
        run_taylor_memory(out_stem)
        return
    sweep = SWEEPS[MEMORY_SWEEP]
    case = sweep.selected(args.quick)[-1]
    results = measure(engine_names, case, args.device, timeout_s=600.0)
    print(format_memory(case, results))
    json_path = out_stem.with_name(out_stem.name + "-memory").with_suffix(".json")
    write_json(json_path, {"machine": machine_info(args.device), "case": case.to_dict(),
                           "memory": [asdict(r) for r in results]})
    print(f"\nresults: {json_path}")


def warn_if_busy() -> None:
    """Say so when other processes already keep the cores busy: timings will be noisy."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores before starting; other "
              "processes will distort the timings")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        list_sweeps()
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        engine_names = expand_engine_names([n.strip() for n in args.engines.split(",")
                                            if n.strip()])
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_stem = args.out / f"run-{stamp}{'-quick' if args.quick else ''}"
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"python {sys.version.split()[0]}")
    warn_if_busy()
    if args.memory:
        run_memory(args, engine_names, out_stem)
    else:
        run_sweeps(args, engine_names, out_stem)


if __name__ == "__main__":
    main()
