"""Passes stage: rewrites of the generated graph, before codegen turns it into code.

:func:`rewrite` is the one entry point. It rewrites the emitted graph in place, each pass
in its own module:

* :mod:`~hod.passes.fuse`: outer products as broadcast ``mul``; ``mm`` of a transpose as
  ``linear``; products of expanded tensors before the expansion; integer powers as
  products (CPU); ``a + b * c`` as ``addcmul``;
* :mod:`~hod.passes.fold`: numbers multiplying large tensors moved onto small ones;
* :mod:`~hod.passes.fills`: fills made from a tensor's shape alone, so that the tensor
  (a loss value no result needs) is not computed;
* :mod:`~hod.passes.pairs`: the top order's symmetrization moved before matrix products,
  and narrow products computed in their cheaper layout;

and then makes the *planned* variant, which runs instead on tensors that no transform
watches:

* :mod:`~hod.passes.memory` (CPU): large tensors written into reused memory, with the
  concatenations of :mod:`~hod.passes.concat` written in place;
* :mod:`~hod.passes.views`: chains of views as single ``as_strided`` calls, with the
  layouts observed on the call's own tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from .._emitter import graph_module
from .fills import fills_from_shapes
from .fold import fold_scalar_factors
from .fuse import (
    fuse_multiply_add,
    fuse_transposed_mm,
    integer_powers_as_products,
    outer_products_as_mul,
    products_before_expands,
)
from .memory import Memory, copy_graph, plan
from .pairs import permuted_narrow_products, symmetrize_before_products
from .views import collapse_view_chains


@dataclass
class Rewritten:
    """The rewritten graph; its planned variant (None when it would be the same code),
    and the reused memory that variant writes into (None when it writes into none)."""

    graph: fx.Graph
    planned: fx.Graph | None = None
    memory: Memory | None = None


def rewrite(
    graph: fx.Graph, constants: dict[str, torch.Tensor], device: torch.device, *,
    plan_memory: bool = True, probe: Sequence[torch.Tensor] | None = None,
) -> Rewritten:
    """Rewrite ``graph`` (dead code removed), which reads ``constants`` by name, and make
    its planned variant: on the CPU with ``plan_memory`` it writes its large tensors into
    reused memory; with ``probe``, the call's tensors, its view chains are single calls."""
    fills_from_shapes(graph, device)
    outer_products_as_mul(graph)
    fuse_transposed_mm(graph)
    graph.eliminate_dead_code()  # the passes below look at who reads what
    fold_scalar_factors(graph)
    products_before_expands(graph)
    if device.type == "cpu":
        integer_powers_as_products(graph)
    symmetrize_before_products(graph)
    permuted_narrow_products(graph)
    fuse_multiply_add(graph)
    graph.eliminate_dead_code()
    planned = plan(graph) if plan_memory and device.type == "cpu" else None
    fast, reused = planned if planned is not None else (copy_graph(graph), None)
    collapsed = probe is not None and collapse_view_chains(
        fast, lambda g: graph_module(g, constants),
        [*probe, *(reused.tensors() if reused is not None else [])], len(probe),
    )
    if planned is None and not collapsed:
        return Rewritten(graph)
    return Rewritten(graph, fast, reused)
