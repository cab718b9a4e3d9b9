"""Timing primitives and the interleaved repetition scheduler.

All engines of a row are timed in rounds: each round calls every engine that still needs
samples once, so slow drifts of the machine (thermal, other load) hit all engines alike.
An engine keeps being sampled until it has ``min_reps`` samples and has spent ``target_s``
seconds, or has ``max_reps`` samples, whichever comes first; the reported figure is the median.

A short call that follows another engine's turn is preceded by one untimed call of its
own: after the harness has waited on the thoad worker (another process) the core has gone
idle, and the next call runs several times slower (seen: 0.04 ms calls measured at 0.2 ms),
which would charge that wait to whichever engine comes next in the round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: str) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """Call ``fn`` once; return its result and the wall time in seconds (device synchronized)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def call_timer(fn: Callable[[torch.Tensor], object], x: torch.Tensor,
               device: str = "cpu") -> Callable[[], float]:
    """A caller for :func:`interleaved`: one call ``fn(x)``, its wall time in seconds."""
    return lambda: timed(lambda: fn(x), device)[1]


@dataclass(frozen=True)
class RepPolicy:
    """How many timed calls each engine gets in one row."""

    min_reps: int
    max_reps: int
    target_s: float

    def wants_more(self, samples: list[float]) -> bool:
        """Whether an engine with these samples should be called again."""
        if len(samples) < self.min_reps:
            return True
        return len(samples) < self.max_reps and sum(samples) < self.target_s


QUICK_POLICY = RepPolicy(min_reps=3, max_reps=10, target_s=0.3)
FULL_POLICY = RepPolicy(min_reps=5, max_reps=50, target_s=2.0)


def interleaved(
    callers: dict[str, Callable[[], float]],
    policy: RepPolicy,
    caps: dict[str, int] | None = None,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> dict[str, list[float]]:
    """Sample each ``callers[name]()`` (which returns one call's seconds) in interleaved rounds.

    ``caps`` lowers ``max_reps`` for some engines (e.g. 1 for an engine over its time budget).
    An exception from a caller stops sampling that engine and is passed to ``on_error``.
    """
    caps = caps or {}
    warm_below_s = 0.02
    samples: dict[str, list[float]] = {name: [] for name in callers}
    active = set(callers)
    while active:
        for name in list(callers):
            if name not in active:
                continue
            s = samples[name]
            if not policy.wants_more(s) or len(s) >= caps.get(name, policy.max_reps):
                active.discard(name)
                continue
            try:
                if s and s[-1] < warm_below_s:
                    callers[name]()  # untimed: see the module docstring
                s.append(callers[name]())
            except Exception as exc:  # any engine failure is reported, not raised
                active.discard(name)
                if on_error is not None:
                    on_error(name, exc)
    return samples


def median_ms(samples: list[float]) -> float | None:
    """Median of samples in seconds, as milliseconds (None when there are none)."""
    return 1e3 * statistics.median(samples) if samples else None
