"""Compile stage: generated code compiled with ``torch.compile`` (the ``compile=`` keyword).

The generated code is one straight line of ATen calls whose shapes are fixed by the
signature, which is what a compiler fuses best: the Faà di Bruno and Leibniz terms are
many small broadcasting products and sums that inductor turns into a few loops, without
a Python call, a dispatch and a fresh tensor per term. Compilation happens on the first
call of a signature (seconds to tens of seconds) and is kept with that signature's code.

The compiled code runs on tensors no transform watches (see
:func:`~hod.passes.memory.unwatched`); a call under autograd, ``torch.func`` transforms or an
enclosing ``torch.compile`` runs the eager code, which computes the same values. Under
``vmap`` the batched code runs on the unwrapped tensors (see :mod:`hod._vmap`), compiled.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx

from ._emitter import REALIZE
from .errors import CompileError, InputError
from .passes.memory import unwatched

#: The ``torch.compile`` keywords ``compile=`` may set (hod fixes ``fullgraph=True`` and
#: ``dynamic=False``: a signature's code never changes shape).
COMPILE_KEYWORDS = ("backend", "mode", "options")


def compile_options(call: str, compile: object) -> dict[str, Any] | None:
    """The ``torch.compile`` keywords for ``compile=`` (None: do not compile)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        unknown = sorted(str(k) for k in compile if k not in COMPILE_KEYWORDS)
        if not unknown:
            return dict(compile)
        problem = f"a dict with the keys {unknown}"
    else:
        problem = repr(compile)
    raise InputError(
        f"{call}: compile must be True, False or a dict of torch.compile keywords "
        f"({', '.join(COMPILE_KEYWORDS)}), got {problem}.\n"
        f"  Fix: e.g. compile=True, or compile={{'mode': 'max-autotune'}}."
    )


def with_realized_outputs(graph_module: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``graph_module`` (sharing its tensors) that also returns the nodes marked
    :data:`~hod._emitter.REALIZE`, and how many outputs it had before.

    Inductor inlines a pointwise result into each reader; a symmetrized derivative read by
    a ``diag_embed`` that spreads it over a batch diagonal would then be recomputed, six
    permuted loads at a time, at every entry of a mostly-zero block. An output is always
    computed into memory, and its readers load it from there.
    """
    graph = fx.Graph()
    values = graph.graph_copy(graph_module.graph, {})
    extra = [n for n in graph.nodes if n.meta.get(REALIZE)]
    graph.output([*values, *extra])
    return fx.GraphModule(graph_module, graph), len(values)


class CompiledCode:
    """``graph_module`` compiled with ``torch.compile(**options)`` on its first call."""

    def __init__(
        self, graph_module: fx.GraphModule, options: dict[str, Any], call: str,
        captured: Sequence[torch.Tensor],
    ) -> None:
        module, self._n_results = with_realized_outputs(graph_module)
        self._function = torch.compile(module, fullgraph=True, dynamic=False, **options)
        self._call = call
        self._captured = list(captured)
        self._compiled = False
        self._lock = threading.Lock()

    def usable(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether the compiled code may run on ``inputs`` (and the captured tensors)."""
        return unwatched(inputs) and unwatched(self._captured)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._compiled:
            return self._function(*inputs)[: self._n_results]
        with self._lock:  # one thread compiles; the others wait for its code
            try:
                result = self._function(*inputs)
            except Exception as exc:
                raise CompileError(
                    f"{self._call}: torch.compile failed on the generated code: "
                    f"{_describe(exc)}\n"
                    f"  Expected: torch.compile to compile the straight-line ATen code hod "
                    f"generated for this signature.\n"
                    f"  Fix: pass compile=False (the eager code computes the same values); "
                    f"the default inductor backend needs a C++ compiler on the CPU, and "
                    f"compile={{'backend': 'aot_eager'}} needs none."
                ) from exc
            self._compiled = True
            return result[: self._n_results]


def _describe(exc: BaseException) -> str:
    """The root cause's type and first line (dynamo wraps a backend's error in its own)."""
    while getattr(exc, "inner_exception", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"
