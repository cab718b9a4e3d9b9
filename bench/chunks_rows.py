"""The rows of the ``chunks`` sweep (issue #20) and the programs its child processes run.

Two kinds of row, both float32 Hessians of a function of one 1-D tensor:

* :class:`MemoryRow`: the input Hessian of a wide one-hidden-layer tanh net,
  ``u(x) = w2 . tanh(W1 x + b1)`` with ``x: (inputs,)`` and ``W1: (width, inputs)``. Its
  Hessian is ``(inputs, inputs)``, but the unchunked code's intermediates are
  ``(inputs, width)``: intermediates dominate, which is what ``chunk_size`` cuts.
  :func:`memory_child` is one setting's peak-memory child (:mod:`bench.memory`).
* :class:`DistributedRow`: the parameter Hessian of a small tanh MLP's mean squared error
  over a batch (:func:`mlp_loss`; the 20-69-50-1 net has 5,000 parameters), computed by one
  setting on some number of processes. :func:`rank_main` is what each rank runs under
  ``python -m torch.distributed.run``.

Everything is drawn in float32 from the row's seed and built in place (no transient copies,
so that a child's peak before computing is its steady state), then cast to the asked dtype,
so the float64 reference sees the values the engines get.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.memory import BASELINE, CALLS, peak_rss_mib

HOD = "hod"
TORCH_FUNC = "torch.func"
#: The result file rank 0 writes (the whole Hessian, after the peak was read).
RESULT_FILE = "result.pt"
Problem = tuple[Callable[[Tensor], Tensor], Tensor]


def chunk_setting(chunk_size: int | None) -> str:
    """How a memory row names hod with ``chunk_size`` (plain ``hod`` for None)."""
    return HOD if chunk_size is None else f"{HOD} chunk_size={chunk_size}"


def chunk_of(setting: str) -> int | None:
    """The ``chunk_size`` of a :func:`chunk_setting` name."""
    return int(setting.split("=", 1)[1]) if "=" in setting else None


# --- the chunked-memory row ----------------------------------------------------------------

@dataclass(frozen=True)
class MemoryRow:
    """The wide tanh net's input Hessian, unchunked and at each of ``chunks``."""

    inputs: int
    width: int
    chunks: tuple[int, ...]

    def label(self) -> str:
        return (f"input Hessian of a tanh net {self.inputs}-{self.width}-1, "
                f"x ({self.inputs}), intermediates ({self.inputs}, {self.width})")

    def settings(self) -> list[str]:
        """Unchunked hod first (the reference of the memory ratio), then each chunk size."""
        return [chunk_setting(None), *(chunk_setting(c) for c in self.chunks)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "memory", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryRow:
        return cls(data["inputs"], data["width"], tuple(data["chunks"]))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wide_net(row: MemoryRow, seed: int, dtype: torch.dtype = torch.float32) -> Problem:
    """``u`` and ``x`` of the row (module docstring); weights scaled to keep tanh curved."""
    g, n, m = _generator(seed), row.inputs, row.width
    W1 = torch.randn(m, n, generator=g).div_(n ** 0.5).to(dtype)
    b1 = torch.randn(m, generator=g).to(dtype)
    w2 = torch.randn(m, generator=g).div_(m ** 0.5).to(dtype)
    x = torch.randn(n, generator=g).to(dtype)

    def u(x: Tensor) -> Tensor:
        return w2 @ torch.tanh(W1 @ x + b1)

    return u, x


def memory_child(setting: str, row: MemoryRow, device: str) -> dict[str, object]:
    """One peak-memory child: build the row and import hod (the baseline stops here), then
    ``CALLS`` calls of the setting's ``hod.hessian``; the report has the call times and the
    child's peak (:func:`peak_rss_mib`)."""
    f, x = wide_net(row, memory_seed(row))
    import hod

    if setting == BASELINE:
        return {"status": "ok", "peak_mib": peak_rss_mib()}
    fn = hod.hessian(f, chunk_size=chunk_of(setting))
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        fn(x)
        times.append(1e3 * (time.perf_counter() - start))
    return {"status": "ok", "call_ms": times, "peak_mib": peak_rss_mib()}


def memory_seed(row: MemoryRow) -> int:
    """The row's seed: its sizes only, so that every child draws the same weights."""
    return 1000 * row.inputs + row.width


# --- the distributed rows ------------------------------------------------------------------

@dataclass(frozen=True)
class DistributedRow:
    """One setting of the MLP loss's parameter Hessian on ``processes`` processes.

    ``sizes`` are the MLP's widths (inputs, hidden, hidden), ``samples`` its batch;
    ``engine`` is ``hod`` or ``torch.func`` (``torch.func.hessian``); ``group`` passes
    ``group=torch.distributed.group.WORLD`` to hod.
    """

    sizes: tuple[int, int, int]
    samples: int
    processes: int
    engine: str = HOD
    chunk_size: int | None = None
    group: bool = False

    def parameters(self) -> int:
        d, h1, h2 = self.sizes
        return d * h1 + h1 + h1 * h2 + h2 + h2 + 1

    def problem_label(self) -> str:
        d, h1, h2 = self.sizes
        return (f"parameter Hessian of a tanh MLP {d}-{h1}-{h2}-1's mean squared error over "
                f"{self.samples} samples, theta ({self.parameters()})")

    def setting(self) -> str:
        if self.engine == TORCH_FUNC:
            return "torch.func.hessian(f)"
        keywords = [*(["group=WORLD"] if self.group else []),
                    *([f"chunk_size={self.chunk_size}"] if self.chunk_size else [])]
        return f"hod.hessian(f{''.join(', ' + k for k in keywords)})"

    def label(self) -> str:
        """The setting and its processes: a key of the row's results."""
        plural = "es" if self.processes > 1 else ""
        return f"{self.setting()}, {self.processes} process{plural}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "distributed", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistributedRow:
        return cls(tuple(data["sizes"]), data["samples"], data["processes"], data["engine"],
                   data["chunk_size"], data["group"])


def mlp_loss(sizes: tuple[int, int, int], samples: int, seed: int,
             dtype: torch.dtype = torch.float32) -> Problem:
    """``f(theta)``: the mean squared error of a tanh MLP ``d-h1-h2-1`` whose weights and
    biases are the flat ``theta``, over a fixed batch ``X: (samples, d)``, ``y: (samples,)``;
    and ``theta`` (Glorot-like scale)."""
    g = _generator(seed)
    d, h1, h2 = sizes
    shapes = [(h1, d), (h1,), (h2, h1), (h2,), (h2,), ()]
    numels = [torch.Size(s).numel() for s in shapes]
    X = torch.randn(samples, d, generator=g).to(dtype)
    y = torch.randn(samples, generator=g).to(dtype)
    scales = [d, d, h1, h1, h2, h2]
    theta = torch.cat([torch.randn(k, generator=g).div_(s ** 0.5)
                       for k, s in zip(numels, scales, strict=True)]).to(dtype)

    def f(theta: Tensor) -> Tensor:
        W1, b1, W2, b2, w3, b3 = (p.reshape(s) for p, s in
                                  zip(theta.split(numels), shapes, strict=True))
        hidden = torch.tanh(torch.tanh(X @ W1.T + b1) @ W2.T + b2)
        return (hidden @ w3 + b3 - y).square().mean()

    return f, theta


def distributed_seed(row: DistributedRow) -> int:
    """The problem's seed: its sizes only, the same for every setting and rank."""
    return sum(row.sizes) * 1000 + row.samples


def hessian_of(row: DistributedRow, f: Callable[[Tensor], Tensor]) -> Callable:
    """The row's engine: ``torch.func.hessian(f)`` or ``hod.hessian`` with its keywords."""
    if row.engine == TORCH_FUNC:
        return torch.func.hessian(f)
    import torch.distributed as dist

    import hod

    group = dist.group.WORLD if row.group else None
    return hod.hessian(f, chunk_size=row.chunk_size, group=group)


def rank_main(row: DistributedRow, calls: int, out: Path) -> None:
    """One rank's run under torchrun (gloo): build the problem, read the peak so far (the
    rank's baseline), make a warm-up call and ``calls`` timed calls, each between two
    barriers (the slowest rank sets the time); read the peak again; then gather the whole
    result (``full_tensor()``), which rank 0 saves for the parent's check. Writes
    ``out/rank-R.json``."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        f, theta = mlp_loss(row.sizes, row.samples, distributed_seed(row))
        fn = hessian_of(row, f)
        dist.barrier()
        baseline = peak_rss_mib()
        times = []
        for _ in range(calls + 1):  # the first call traces and generates: the warm-up
            dist.barrier()
            start = time.perf_counter()
            H = fn(theta)
            dist.barrier()
            times.append(1e3 * (time.perf_counter() - start))
        peak = peak_rss_mib()
        local = H.to_local() if hasattr(H, "to_local") else H
        report = {
            "rank": rank, "world": dist.get_world_size(), "type": type(H).__name__,
            "warmup_ms": times[0], "times_ms": times[1:], "baseline_mib": baseline,
            "peak_above_baseline_mib": peak - baseline,
            "share": local.numel() / H.numel(), "local_shape": list(local.shape),
        }
        whole = H.full_tensor() if hasattr(H, "full_tensor") else H
        if rank == 0:
            torch.save(whole, out / RESULT_FILE)
    except Exception as exc:
        report = {"rank": rank, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        dist.destroy_process_group()
    (out / f"rank-{rank}.json").write_text(json.dumps(report))
