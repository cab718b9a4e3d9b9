"""Plan stage: second-derivative blocks of a batch-compressed input and a weight, per example.

Under batch compression (see :mod:`hod._analysis`) a block pairing a compressed leaf ``x``
with an uncompressed leaf ``W`` is read from ``x``'s gradient seeded by ``W``, so the
reverse sweep carries every seed of every weight back to ``x``: on a width-50 MLP that is
7,550 seeds through the first layer's product, for blocks of 10 x 50 x 7,500 numbers.

A weight's gradient is usually a sum over the batch, such as ``mm(h.T, delta)`` with the
rows of the layer input ``h`` and of ``delta`` tracked. Its per-example terms
``P[r] = outer(h[r], delta[r])`` are then tracked too, so seeding them with ``x``'s
compressed seeds gives the block directly, ``d^2 f / dx[r, s] dW = d P[r] / d x[r, s]``
(cross-row terms are zero), and ``x``'s gradient needs only the compressed seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx

from ._analysis import node_states, track_batch
from ._emitter import Emitter, Operand, graph_call
from ._records import SeedPlan, Segment

aten = torch.ops.aten


def with_per_example_terms(
    gm: fx.GraphModule, diff_positions: Sequence[int], seeds: SeedPlan
) -> tuple[fx.GraphModule, SeedPlan]:
    """A copy of ``gm`` whose outputs ``[y, gradients..., aux...]`` also hold, after the
    gradients, the per-example terms of every uncompressed leaf's gradient, and the seed
    plan that reads them. ``gm`` and ``seeds`` themselves unless some leaf is compressed
    and every uncompressed leaf's gradient is a sum over the batch.
    """
    compressed = {
        diff_positions[leaf]: s.batch_dim
        for leaf, s in enumerate(seeds.segments) if s.batch_dim is not None
    }
    uncompressed = [leaf for leaf, s in enumerate(seeds.segments) if s.batch_dim is None]
    if not compressed:
        return gm, seeds
    graph = fx.Graph()
    outs = list(graph.graph_copy(gm.graph, {}))
    output = graph.output(outs)
    copy = fx.GraphModule(gm, graph)
    builds = _terms(copy, compressed, uncompressed)
    if builds is None:
        return gm, seeds
    with graph.inserting_before(output):
        terms = [build(graph) for build in builds]
    n_grads = len(seeds.segments)
    output.args = (outs[: 1 + n_grads] + terms + outs[1 + n_grads:],)
    copy.recompile()
    plan = SeedPlan(seeds.segments, tuple(track_batch(copy, compressed)), tuple(uncompressed))
    return copy, plan


def _terms(gm: fx.GraphModule, compressed: dict[int, int], leaves: list[int]):
    """How to emit each of ``leaves``' per-example terms (None if one has none)."""
    states = node_states(gm, compressed)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    builds = [_per_example(output.args[0][1 + leaf], states) for leaf in leaves]
    return None if any(b is None for b in builds) else builds


_Build = Callable[[fx.Graph], fx.Node]


def _per_example(node: object, states: dict) -> _Build | None:
    """How to emit ``P`` with ``node = P.sum(0)`` and ``P`` tracked at dim 0, or None.

    Known sums: ``mm(a, b)`` with the columns of ``a`` and the rows of ``b`` tracked (a
    weight's gradient, ``h.T @ delta``) and ``sum(t, [0])`` with ``t`` tracked (a bias's),
    seen through ``permute``, ``t``, ``view`` and ``reshape``.
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    op, args = node.target, node.args
    if op is aten.mm.default and states.get(args[0]) == 1 and states.get(args[1]) == 0:
        a, b = args  # P[r, i, j] = a[i, r] * b[r, j]
        return lambda g: graph_call(
            g, aten.mul.Tensor,
            graph_call(
                g, aten.unsqueeze.default, graph_call(g, aten.permute.default, a, [1, 0]), 2
            ),
            graph_call(g, aten.unsqueeze.default, b, 1),
        )
    if (op is aten.sum.dim_IntList and args[1] is not None and list(args[1]) == [0]
            and states.get(args[0]) == 0 and "dtype" not in node.kwargs):
        keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        return (lambda g: graph_call(g, aten.unsqueeze.default, args[0], 1)) if keepdim else (
            lambda g: args[0]
        )
    inner = _per_example(args[0], states) if args else None
    if inner is None:
        return None
    if op in (aten.permute.default, aten.t.default):
        dims = list(args[1]) if op is aten.permute.default else [1, 0]
        return lambda g: graph_call(g, aten.permute.default, inner(g), [0] + [d + 1 for d in dims])
    if op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        shape = [-1, *node.meta["val"].shape]
        return lambda g: graph_call(g, aten.reshape.default, inner(g), shape)
    return None


def per_example_block(
    em: Emitter, d: Operand, span: tuple[int, int], *, x: Segment, x_first: bool,
    shape: list[int], dtype: torch.dtype,
) -> fx.Node:
    """The block of compressed leaf ``x`` and a weight from ``d``, ``D^1`` of the weight's
    per-example terms: ``(W,) + (B,) + weight.shape`` over the seeds ``span``.

    The seeds of ``x``'s segment are unflattened to ``x.sub_shape`` and the batch axis
    ``B`` goes to ``x.batch_dim``; ``x_first`` puts ``x``'s dims before the weight's.
    """
    lo, hi = span
    if d is None or x.offset < lo or x.offset + x.size > hi:
        return em.zeros(shape, dtype)
    t = d
    if x.size != hi - lo:
        t = em.call(aten.slice.Tensor, t, 0, x.offset - lo, x.offset + x.size)
    sub = list(x.sub_shape)
    rest = list(em.shape(t))[1:]  # (B,) + weight.shape
    t = em.reshape(t, sub + rest)
    n_sub, n_weight = len(sub), len(rest) - 1
    x_dims = list(range(n_sub))
    x_dims.insert(x.batch_dim, n_sub)
    weight_dims = list(range(n_sub + 1, n_sub + 1 + n_weight))
    t = em.permute(t, x_dims + weight_dims if x_first else weight_dims + x_dims)
    t = em.reshape(t, shape)
    if em.dtype_of(t) != dtype:
        t = em.call(aten._to_copy.default, t, dtype=dtype)
    return t
