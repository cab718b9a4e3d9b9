"""The ``sparse`` sweep (issue #19): sparse Jacobians and Hessians, ``sparse=True``, against
dense engines and a hand-coloured torch.func baseline. Run it with
``python -m bench.run --sweeps sparse``; rows in :mod:`bench.sparse_rows`.

Engines, on every row (``f``, ``x`` of the row, float32):

* ``hod sparse``: ``hod.jacobian(f, sparse=True)(x)`` / ``hod.hessian(f, sparse=True)(x)``, a
  torch sparse COO tensor. Its first call (trace, pattern detection, colouring, code
  generation and the call) is timed apart (``first_call_ms``) and is not a timed call;
* ``hod dense``: ``hod.jacobian(f)(x)`` / ``hod.hessian(f)(x)``;
* ``torch.func dense``: ``torch.func.jacrev(f)(x)`` / ``torch.func.hessian(f)(x)``;
* ``torch.func hand-coloured``: what a PyTorch user writes today given a colouring:
  ``vmap`` over ``torch.func.jvp`` of ``f`` (of ``torch.func.grad(f)`` for a Hessian) along the
  colour directions ``S`` (``(colours, n)``, row ``c`` the indicator of colour ``c``), the
  nonzeros read from the compressed result at their recovery positions and put in a
  ``torch.sparse_coo_tensor``. It gets hod's own pattern and colours (``fn.lower(x).sparsity``)
  and the recovery of :mod:`hod._coloring` (``jacobian_recovery`` / ``hessian_recovery``),
  computed once outside the timing: it isolates the per-call cost.

The reference (:func:`reference`): torch.func in float64 on the same inputs cast to float64,
row blocks of the derivative at a time (``vmap`` of the pullback of ``f``, of ``grad(f)`` for a
Hessian, over unit cotangents), kept as a float64 sparse tensor of its nonzeros; so it never
holds the dense matrix. Every engine's first result is compared with it (:func:`check`: the
largest ``|got - ref|`` over ``max|ref|``, at most :data:`bench.compare.RTOL` +
:data:`bench.compare.ATOL`; a sparse result must have the dense shape); a wrong engine is not
timed. Then the engines that passed are timed interleaved (:func:`bench.timing.interleaved`);
one whose first call took more than :data:`BUDGET_S` gets one timed call. The dense engines
run under an address-space cap of :data:`DENSE_CAP_GIB` GiB above the process's size
(:func:`address_space_cap`): one that does not fit fails with ``OOM``, measured, not guessed.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from bench.compare import ATOL, RTOL
from bench.engines import failure_kind
from bench.runner import OK, WRONG
from bench.sparse_rows import HESSIAN, SparseRow, make_problem
from bench.tables import SPARSE, sweep_tables
from bench.timing import RepPolicy, call_timer, interleaved, median_ms

TITLE = ("sparse Jacobians and Hessians in float32: hod sparse=True against dense hod, dense "
         "torch.func and hand-coloured torch.func")
HOD_SPARSE, HOD_DENSE = "hod sparse", "hod dense"
TORCH_FUNC, HAND = "torch.func dense", "torch.func hand-coloured"
ENGINES = (HOD_SPARSE, HOD_DENSE, TORCH_FUNC, HAND)
CALLS = {
    HOD_SPARSE: "hod.jacobian(f, sparse=True)(x) / hod.hessian(f, sparse=True)(x)",
    HOD_DENSE: "hod.jacobian(f)(x) / hod.hessian(f)(x)",
    TORCH_FUNC: "torch.func.jacrev(f)(x) / torch.func.hessian(f)(x)",
    HAND: "vmap over torch.func.jvp of f (of grad(f)) along the colour directions, nonzeros "
          "read at the recovery positions into torch.sparse_coo_tensor",
}
ROWS = [
    SparseRow("bratu", 32), SparseRow("bratu", 64), SparseRow("bratu", 128),
    SparseRow("rosenbrock", 1000), SparseRow("rosenbrock", 10_000),
    SparseRow("banded", 1000), SparseRow("banded", 10_000),
    SparseRow("energy", 3000), SparseRow("conv", 10_000),
]
QUICK_ROWS = [SparseRow("bratu", 16), SparseRow("rosenbrock", 300), SparseRow("energy", 300),
              SparseRow("conv", 500)]
#: Seconds of a first call above which an engine gets one timed call.
BUDGET_S = 20.0
#: GiB the dense engines may map above the process's size before they fail with OOM.
DENSE_CAP_GIB = 8.0
#: Bytes of float64 in one block of rows of the reference.
REFERENCE_BLOCK_BYTES = 2 ** 27
#: The issue's targets: hod sparse's speedup over dense torch.func on rows with n at least
#: ``TARGET_N``, over the hand-coloured baseline, and stored entries over the pattern's.
TARGET_DENSE, TARGET_N, TARGET_HAND, TARGET_STORED = 50.0, 3000, 2.0, 3.0


# --- the reference and the check -------------------------------------------------------------

def reference(row: SparseRow) -> Tensor:
    """The row's derivative in float64 by torch.func, a block of rows at a time (module
    docstring): a coalesced sparse COO tensor of its nonzeros, ``(outputs, n)``."""
    f, x = make_problem(row, torch.float64)
    g = grad(f) if row.kind == HESSIAN else f
    out, pullback = vjp(g, x)
    m = out.numel()
    step = max(1, REFERENCE_BLOCK_BYTES // (8 * x.numel()))
    indices, values = [], []
    for start in range(0, m, step):
        rows = torch.arange(start, min(m, start + step))
        unit = torch.zeros(len(rows), m, dtype=torch.float64)
        unit[torch.arange(len(rows)), rows] = 1
        (block,) = vmap(pullback)(unit.reshape(len(rows), *out.shape))
        found = block.reshape(len(rows), -1).nonzero().T
        values.append(block.reshape(len(rows), -1)[found[0], found[1]])
        indices.append(found + torch.tensor([[start], [0]]))
    return torch.sparse_coo_tensor(torch.cat(indices, 1), torch.cat(values), (m, x.numel()),
                                   is_coalesced=True, check_invariants=False)


def check(got: Tensor, ref: Tensor) -> tuple[bool, float, str]:
    """Whether ``got`` (dense or sparse) matches ``ref`` (:func:`reference`): its shape, every
    value finite, and ``max|got - ref| <= (RTOL + ATOL) max|ref|``; the relative error and a
    sentence."""
    if tuple(got.shape) != tuple(ref.shape):
        return False, float("inf"), f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    ours = (got if got.is_sparse else got.to_sparse()).double().coalesce()
    if not bool(ours.values().isfinite().all()):
        return False, float("inf"), "non-finite values"
    diff = (ours - ref).coalesce().values().abs()
    scale = float(ref.values().abs().max()) if ref._nnz() else 1.0
    err = (float(diff.max()) if diff.numel() else 0.0) / scale
    ok = err <= RTOL + ATOL
    said = f"max|got - ref| / max|ref| = {err:.1e} (tolerance {RTOL + ATOL:.1e})"
    return ok, err, f"{'ok' if ok else 'WRONG'}: {said}"


# --- the engines -----------------------------------------------------------------------------

def hand_coloured(row: SparseRow, f: Callable[[Tensor], Tensor], sparsity: Any,
                  like: Tensor) -> Callable[[Tensor], Tensor]:
    """The hand-coloured baseline (module docstring) for ``sparsity``
    (``fn.lower(x).sparsity`` of hod sparse), its colour directions and recovery computed
    here, once."""
    from hod._coloring import hessian_recovery, jacobian_recovery

    pattern, colors = sparsity.pattern, sparsity.colors
    directions = torch.zeros(sparsity.colours, colors.numel(), dtype=like.dtype)
    directions[colors, torch.arange(colors.numel())] = 1
    if row.kind == HESSIAN:
        entries, colour = hessian_recovery(pattern, colors)
        g = grad(f)
    else:
        entries, colour = pattern[0], jacobian_recovery(pattern, colors)
        g = f
    shape = tuple(sparsity.shape)

    def derivative(x: Tensor) -> Tensor:
        compressed = vmap(lambda v: jvp(g, (x,), (v,))[1])(directions)  # (colours, entries)
        return torch.sparse_coo_tensor(pattern, compressed[colour, entries], shape,
                                       is_coalesced=True, check_invariants=False)

    return derivative


def dense_engine(name: str, row: SparseRow, f: Callable[[Tensor], Tensor]) -> Callable:
    import hod

    if name == HOD_DENSE:
        return hod.hessian(f) if row.kind == HESSIAN else hod.jacobian(f)
    return torch.func.hessian(f) if row.kind == HESSIAN else torch.func.jacrev(f)


@contextlib.contextmanager
def address_space_cap(gib: float) -> Iterator[None]:
    """Cap this process's address space at its present size plus ``gib`` GiB (Linux); an
    allocation past it fails (torch raises), instead of the machine swapping or killing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text()
                  .splitlines() if line.startswith("VmSize:"))
    cap = vm_kib * 1024 + int(gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY
                                            else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --- a row -----------------------------------------------------------------------------------

def result_entry() -> dict[str, Any]:
    return {"status": "", "median_ms": None, "times_ms": [], "warmup_ms": None, "detail": "",
            "check_rel_err": None, "check": ""}


def _first_call(result: dict[str, Any], fn: Callable[[Tensor], Tensor], x: Tensor,
                ref: Tensor) -> Tensor | None:
    """Call ``fn`` once, check it, record both in ``result``; its value (None on failure)."""
    try:
        began = time.perf_counter()
        got = fn(x)
        result["warmup_ms"] = 1e3 * (time.perf_counter() - began)
        ok, err, said = check(got, ref)
    except Exception as exc:  # any engine failure is reported, not raised
        result.update(status=failure_kind(exc), detail=f"{type(exc).__name__}: {exc}"[:300])
        return None
    result.update(status=OK if ok else WRONG, check=said, check_rel_err=err)
    if not ok:
        result["detail"] = said
    return got


def run_row(row: SparseRow, policy: RepPolicy, log: Callable[[str], None] = print,
            dense_cap_gib: float = DENSE_CAP_GIB) -> dict[str, Any]:
    """Check, then time, every engine on ``row`` (module docstring): the row's result entry."""
    import hod

    start = time.perf_counter()
    ref = reference(row)
    reference_s = time.perf_counter() - start
    f, x = make_problem(row)
    results = {name: result_entry() for name in ENGINES}
    fns: dict[str, Callable[[Tensor], Tensor]] = {}
    entry: dict[str, Any] = {"x": row.label(), "label": row.label(), "case": row.to_dict(),
                             "kind": row.kind, "n": row.n, "reference_nnz": ref._nnz(),
                             "reference_s": round(reference_s, 2)}
    transform = hod.hessian if row.kind == HESSIAN else hod.jacobian
    fns[HOD_SPARSE] = transform(f, sparse=True)
    got = _first_call(results[HOD_SPARSE], fns[HOD_SPARSE], x, ref)
    if got is not None:
        sparsity = fns[HOD_SPARSE].lower(x).sparsity
        entry.update(nnz=sparsity.nnz, colours=sparsity.colours, stored=int(got._nnz()),
                     first_call_ms=results[HOD_SPARSE]["warmup_ms"])
        fns[HAND] = hand_coloured(row, f, sparsity, x)
        _first_call(results[HAND], fns[HAND], x, ref)
    else:
        results[HAND].update(status="n/a", detail="no colouring: hod sparse failed")
    del got
    for name in (HOD_DENSE, TORCH_FUNC):
        log(f"  sparse: {row.label()}: {name} ...")
        fns[name] = dense_engine(name, row, f)
        with address_space_cap(dense_cap_gib):
            _first_call(results[name], fns[name], x, ref)
    callers = {name: call_timer(fns[name], x) for name, r in results.items() if r["status"] == OK}
    caps = {name: 1 for name in callers if results[name]["warmup_ms"] > 1e3 * BUDGET_S}

    def on_error(name: str, exc: BaseException) -> None:
        results[name].update(status=failure_kind(exc), detail=f"{type(exc).__name__}: {exc}")

    with address_space_cap(dense_cap_gib):
        timed = interleaved(callers, policy, caps, on_error=on_error)
    for name, samples in timed.items():
        results[name].update(times_ms=[1e3 * s for s in samples], median_ms=median_ms(samples))
    entry.update(seconds=round(time.perf_counter() - start, 2), engines=results)
    return entry


# --- the sweep -------------------------------------------------------------------------------

def notes() -> list[str]:
    return [
        *(f"{name}: {call}" for name, call in CALLS.items()),
        "the hand-coloured baseline gets hod's pattern, colours and recovery (computed once, "
        "outside the timing): the ratio against it is the per-call cost alone",
        "first call: hod sparse's first call of the signature (trace, pattern detection, "
        "colouring, code generation, the call), not part of its median",
        "stored / nnz: the entries hod's sparse result stores (`_nnz()`) over the pattern's "
        f"nonzeros (target <= {TARGET_STORED:g}); targets: >= {TARGET_DENSE:g}x faster than "
        f"dense torch.func on rows with n >= {TARGET_N:,}, >= {TARGET_HAND:g}x faster than "
        "the hand-coloured baseline",
        "checks: every engine's first result against torch.func in float64, computed a block "
        "of rows at a time (vmap of the pullback over unit cotangents) and kept sparse; "
        f"max|got - ref| / max|ref| <= {RTOL + ATOL:.1e}; a wrong engine is not timed",
        f"dense engines run under an address-space cap of {DENSE_CAP_GIB:g} GiB above the "
        f"process's size (OOM when they do not fit); one whose first call takes more than "
        f"{BUDGET_S:g} s is timed once",
    ]


def run_sparse_sweep(
    policy: RepPolicy, quick: bool = False, log: Callable[[str], None] = print,
    rows: list[SparseRow] | None = None, dense_cap_gib: float = DENSE_CAP_GIB,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every row (``rows``, default :data:`ROWS` or :data:`QUICK_ROWS`): the sweep in the
    result file's form, and the engines' versions."""
    import hod

    results = []
    for row in rows or (QUICK_ROWS if quick else ROWS):
        log(f"  sparse: {row.label()} ...")
        results.append(run_row(row, policy, log, dense_cap_gib))
    version = f"hod {getattr(hod, '__version__', '?')} from {hod.__file__}"
    versions = {HOD_SPARSE: version, HOD_DENSE: version, TORCH_FUNC: f"torch {torch.__version__}",
                HAND: f"torch {torch.__version__}"}
    return {"name": SPARSE, "title": TITLE, "x_name": "row", "kind": SPARSE,
            "notes": notes(), "rows": results}, versions


def format_sparse(sweep: dict[str, Any]) -> str:
    """The sweep's table (:func:`bench.tables.sparse_grid`) with the notes, in Markdown."""
    return sweep_tables({"sweeps": [sweep]})


def list_rows() -> str:
    """The rows, for ``python -m bench.run --list``."""
    return "\n".join([f"{SPARSE:15s} {TITLE}", *(f"{'':15s} {r.label()}" for r in ROWS),
                      f"{'':15s} --quick: {'; '.join(r.label() for r in QUICK_ROWS)}"])
