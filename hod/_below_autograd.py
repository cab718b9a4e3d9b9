"""Codegen stage: the planned code run below autograd's dispatch keys.

The planned code runs only where autograd records nothing: on tensors no transform
watches, or inside :class:`~hod._recompute.Recomputed`'s forward, where grad mode is off.
Each of its calls still passes through the ``Autograd`` and ``ADInplaceOrView`` dispatch
keys, which then only check that there is nothing to record; under
``torch._C._AutoDispatchBelowADInplaceOrView`` the calls go straight to the kernels (the
GRU input Hessian's 880 calls took 1.51 ms under ``no_grad`` and 1.33 ms below them).

Tensors made there carry no autograd view information: a view is not known to be one,
and it does not share its base's version counter. The code's own memory never reaches
the caller except through the results, so that matters only where results alias: a
result viewing a caller's tensor (an input or a captured one), or two results viewing
overlapping memory, whose in-place changes autograd would then miss. The code runs below
only where neither can happen: :func:`results_own` says from the graph that no result views
a caller's tensor, and :func:`apart` from the first call's results that no two overlap
(their layouts depend on the graph alone, as :mod:`hod.passes.views` relies on too).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import fx

from .passes.views import caller_memory


def results_own(graph: fx.Graph, n_inputs: int) -> bool:
    """Whether no result of ``graph`` may be memory of the caller's: an input, a captured
    tensor or a view of one. Placeholders after the first ``n_inputs`` are the code's own
    memory (see :mod:`hod.passes.memory`)."""
    external = caller_memory(graph, n_inputs)
    return not any(a in external for a in graph.output_node().all_input_nodes)


def apart(results: Sequence[object]) -> bool:
    """Whether no two of ``results`` (tensors) touch the same element of memory."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for t in results:
        if not isinstance(t, torch.Tensor):
            return False
        if t.numel() == 0:
            continue  # touches no memory
        start = t.storage_offset()
        end = start + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
        spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, end))
    for taken in spans.values():
        taken.sort()
        if any(later[0] <= earlier[1] for earlier, later in pairwise(taken)):
            return False
    return True
