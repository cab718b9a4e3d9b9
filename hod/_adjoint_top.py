"""The top order by adjoints: a scalar's ``D^n`` from tangents of order ``n - 1``.

For a scalar ``y`` (one per example, for a call holding examples) every node's ``D^n``
is affine in its inputs' ``D^n``: ``D^n v = sum_a phi_a D^n u_a + R_n(v)``, where the
remainder ``R_n(v)`` holds the inputs' lower orders only (Faà di Bruno's other terms).
The ``D^n`` parts therefore travel through the graph as a linear map, and summing it
backwards gives

    D^n y = sum_v  sum_i  vbar[i] * R_n(v)[..., i]

with ``vbar = dy/dv`` from one reverse sweep of the value. ``R_n(v)`` is ``v``'s own
rule run with its inputs' ``D^n`` set to zero, and it vanishes where ``v`` is linear in
its tracked inputs. So forward mode's top order, ``S^n`` numbers per entry pushed through
every product and view of ``f``, becomes a contraction at the nodes where ``f`` bends:
a PINN's third derivative w.r.t. its 2-D input never carries ``D^3`` through the
hidden layers' matrix products. The lower orders of ``y`` come from the same tangents.
:mod:`hod._adjoint` is the same identity at ``n = 2``, with faster local terms there.

It applies at orders 3 and up to a scalar output (per example) when every node with a
tracked input is elementwise, a small coupled node (a softmax) or linear in it (the
conditions of :func:`hod._adjoint._curved_nodes`), and when the contractions cost less
than the propagation they replace (:func:`_pays`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import fx
from torch.utils._pytree import TreeSpec

from ._adjoint import (
    COUPLED,
    _apply_rule,
    _batch_seeds,
    _contract,
    _curved_nodes,
    _linear_elementwise,
    _tensor_args,
    _trace_adjoints,
    _tracked,
    _tracked_inputs,
    _tracked_work,
    _unit_partials,
)
from ._assemble import block, result_spec, structure
from ._combinatorics import partition_kinds
from ._derive import derive, seeded_inputs
from ._emitter import Emitter, Operand
from ._jet import DeriveContext
from ._plan import choose_mode, plain_segments, row_seeds
from ._records import BuildState, Derived, Jet, Mode, SeedPlan
from ._tracing import op_call_site

aten = torch.ops.aten


def adjoint_top_order(
    state: BuildState, shapes: Sequence[tuple[int, ...]], planned: SeedPlan
) -> tuple[Emitter, TreeSpec, int] | None:
    """The derivatives of ``f``'s scalar output with the top order summed from local
    terms: the emitter holding their code (outputs emitted), the result's spec and the
    seed-space size; or None where it does not apply or does not pay. ``planned`` are the
    seeds the other modes would use: where they compress a batch, those modes run."""
    request, flat, forward = state.request, state.flat, state.forward
    gm, order = forward.gm, request.order
    compressed = not planned.rows and any(s.batch_dim is not None for s in planned.segments)
    if order < 3 or forward.n_out != 1 or compressed:
        return None
    if state.out_vals[0].numel() != (flat.rows or 1):
        return None
    tracked = _tracked(gm, flat.diff)
    curved = _curved_nodes(gm, tracked)
    if curved is None:
        return None
    if flat.rows is None and _batch_seeds(gm, flat.diff, shapes, curved) is not None:
        return None  # a batch of independent rows: the other modes seed one row
    curved = [n for n in curved if not _linear_elementwise(n, tracked)]
    if flat.rows is not None:
        seeds = row_seeds(shapes, [0])
    else:
        seeds = SeedPlan(tuple(plain_segments(shapes)), ())
    if not _pays(tracked, curved, seeds.size, order):
        return None
    return _generate(state, _trace_adjoints(state, curved), curved, seeds)


def _pays(tracked: set[fx.Node], curved: list[fx.Node], seeds: int, order: int) -> bool:
    """Whether the local terms cost less than the propagation they replace.

    Forward mode carries ``S^n`` numbers per tracked entry and per multiply-add of a
    product (``W`` of them, :func:`hod._adjoint._tracked_work`); reverse-last mode (one
    output, many seeds) carries ``S^(n-1)`` through the backward pass as well. Here the
    top order costs ``S^n m^n`` per entry of a curved node with ``m`` tracked inputs.
    """
    local = sum(n.meta["val"].numel() * _tracked_inputs(n, tracked) ** order for n in curved)
    forward_mode = choose_mode(order, [1], seeds) is Mode.FORWARD
    return (1 if forward_mode else seeds) * local < _tracked_work(tracked)


def _generate(state: BuildState, graph: fx.GraphModule, curved: list[fx.Node],
              seeds: SeedPlan) -> tuple[Emitter, TreeSpec, int]:
    request, flat = state.request, state.flat
    order, size = request.order, seeds.size
    example = flat.tensors[flat.diff[0]]
    em = Emitter(example.device, example.dtype, request.memory_limit, request.call,
                 compiling=request.compile is not None)
    below = DeriveContext(em, order - 1, size)
    counts = [len(_tensor_args(n)) + 1 for n in curved]
    n_grads = len(flat.diff) if request.with_values else 0
    first_seen = 1 + n_grads + len(curved)
    lower_orders = any(0 < k < order for k in request.orders)
    needs = ([(0, size) if lower_orders else None] + [None] * (first_seen - 1)
             + [span for c in counts for span in [(0, size)] * (c - 1) + [None]])
    jets = derive(graph, below, seeded_inputs(em, flat, seeds, order - 1), call=request.call,
                  call_site=op_call_site(request, flat), needs=needs)
    top = DeriveContext(em, order, size)
    total: Operand = None
    at = first_seen
    for k, node in enumerate(curved):
        args = [_raised(below, jet, order) for jet in jets[at:at + counts[k] - 1]]
        out = jets[at + counts[k] - 1]
        at += counts[k]
        term = _local_term(top, node, args, out.primal, jets[1 + n_grads + k].primal,
                           rows=flat.rows)
        if term is not None:
            total = term if total is None else em.add(total, term)
    value = jets[0]
    derivs = list(below.fit(value, (0, size)).derivs)
    derivs[-1] = below.symmetrized(derivs[-1], order - 1)  # the top order of ``below``
    y = Jet(value.primal, [*derivs, top.symmetrized(total, order)], (0, size))
    keys, specs = structure(state.forward.out_spec, 1, request.argnums, flat.layouts,
                            request.orders)
    dtypes = [flat.tensors[pos].dtype for pos in flat.diff]
    derived = Derived(Mode.FORWARD, seeds, [y], state.out_vals, dtypes)
    aux = [j.primal for j in jets[first_seen + sum(counts):]]
    em.output([block(em, key, derived) for key in keys] + aux)
    return em, result_spec(specs, request, state.forward.aux_spec), size


def _raised(ctx: DeriveContext, jet: Jet, order: int) -> Jet:
    """``jet`` over every seed with one more order, zero: what a rule of ``order`` reads."""
    if jet.is_constant:
        return Jet(jet.primal, [None] * order)
    fitted = ctx.fit(jet, (0, ctx.full_size))
    return Jet(fitted.primal, [*fitted.derivs, None])


def _local_term(ctx: DeriveContext, node: fx.Node, args: list[Jet], out: fx.Node,
                vbar: fx.Node, *, rows: int | None) -> Operand:
    """``sum_i vbar[i] R_n(node)[..., i]``: ``(S,) * n``, or ``(S,) * n + (N,)`` per
    example (``rows``: the sum keeps the node's dim 0, the examples); its symmetrization
    over the seed axes is the node's share of ``D^n y``.

    Faà di Bruno's terms, one per kind of partition of the ``n`` seed positions into two
    or more blocks, are products of the inputs' ``D^k`` weighted by ``vbar`` times a
    partial derivative. Each is summed over the entries as a contraction: the factors
    constant over the examples (a first layer's ``D^1``) or else the one of lowest order
    are contracted, against the product of the others; terms contracted against the same
    factors share one contraction.
    """
    if node.target in COUPLED:
        return _coupled_term(ctx, node, args, out, vbar, rows)
    em, order = ctx.em, ctx.order
    nodes = _tensor_args(node)
    sources = list(dict.fromkeys(n for n, a in zip(nodes, args, strict=True)
                                 if not a.is_constant))  # one seed per tracked node
    rank = em.rank(out)
    weights = _weighted_coefficients(em, node, sources, args, out, vbar, order)
    seeded: dict[tuple[int, int], fx.Node | None] = {}  # (source, k) -> its D^k
    groups: dict[tuple[tuple[int, int], ...], fx.Node] = {}
    for blocks, kinds in partition_kinds(order):
        if len(blocks) < 2 or weights[len(blocks)] is None:
            continue
        sizes = [len(b) for b in blocks]
        for inputs, count in _assignments(sizes, len(sources)).items():
            count *= kinds
            factors = list(zip(inputs, sizes, strict=True))
            for f in factors:
                if f not in seeded:
                    seeded[f] = _seeded(ctx, args[nodes.index(sources[f[0]])], f[1], rank)
            if any(seeded[f] is None for f in factors):
                continue
            constant = [i for i, f in enumerate(factors)
                        if rows is not None and em.shape(seeded[f])[1] == 1]
            at = constant or [len(factors) - 1]
            left = weights[len(blocks)]
            for a in inputs:
                left = em.call(aten.select.int, left, 0, a)
            left = em.reshape(em.mul(left, count) if count > 1 else left, [1, *em.shape(left)])
            for i, f in enumerate(factors):
                if i not in at:
                    left = _outer(em, left, seeded[f])
            key = tuple(factors[i] for i in at)
            groups[key] = em.add(groups[key], left) if key in groups else left
    total: Operand = None
    for contracted, left in groups.items():
        right = seeded[contracted[0]]
        for f in contracted[1:]:
            right = _outer(em, right, seeded[f])
        term = _contracted(em, left, right, rows, [ctx.full_size] * order)
        total = term if total is None else em.add(total, term)
    return total


def _assignments(sizes: list[int], m: int) -> dict[tuple[int, ...], int]:
    """The ways to give each block of a partition (``sizes``, equal sizes adjacent) one of
    ``m`` inputs, up to reordering blocks of equal size (the same term once the seed axes
    are symmetrized), each with how many ways it stands for."""
    found: dict[tuple[int, ...], int] = {}
    for inputs in itertools.product(range(m), repeat=len(sizes)):
        canonical: list[int] = []
        for _, run in itertools.groupby(range(len(sizes)), key=lambda i: sizes[i]):
            canonical += sorted(inputs[i] for i in run)
        key = tuple(canonical)
        found[key] = found.get(key, 0) + 1
    return found


def _contracted(em: Emitter, left: fx.Node, right: fx.Node, rows: int | None,
                lead: list[int]) -> fx.Node:
    """``sum_i left[p, i] right[q, i]`` over the value dims (but the examples' dim 0 with
    ``rows``) as ``lead`` seed axes (``+ (N,)``, contiguous): ``left`` is
    ``(S^a,) + shape``, ``right`` ``(S^b,) + shape`` or, with ``rows``, constant over the
    examples (dim 1 of size 1): then one matrix product over all examples."""
    shape = list(em.shape(left)[1:])
    if rows is None:
        return em.reshape(_contract(em, left, em.expand(right, [em.shape(right)[0], *shape]),
                                    None), lead)
    if em.shape(right)[1] == 1 and shape[0] > 1:  # constant over the examples
        per = math.prod(shape[1:])
        a, b = em.shape(left)[0], em.shape(right)[0]
        flat_right = em.reshape(em.expand(right, [b, 1, *shape[1:]]), [b, per])
        product = em.call(aten.mm.default, em.reshape(left, [a * rows, per]),
                          em.call(aten.t.default, flat_right))  # (a N, b)
        term = em.permute(em.reshape(product, [a, rows, b]), [0, 2, 1])
    else:
        term = em.permute(_contract(em, left, em.expand(right, [em.shape(right)[0], *shape]),
                                    rows), [1, 2, 0])
    return em.call(aten.clone.default, em.reshape(term, [*lead, rows]),
                   memory_format=torch.contiguous_format)


def _weighted_coefficients(em: Emitter, node: fx.Node, sources: list[fx.Node],
                           args: list[Jet], out: fx.Node, vbar: fx.Node,
                           order: int) -> list[Operand]:
    """Per ``k <= order``, ``vbar`` times the node's ``k``-th partial derivatives in its
    ``m`` distinct tracked arguments ``sources``, ``(m,) * k + out.shape`` (None where they
    vanish)."""
    m = len(sources)
    units, derivs = _unit_partials(em, node, sources, args, out, order)
    shape = list(em.shape(out))
    weights: list[Operand] = [None, None]
    for k, d in enumerate(derivs[1:], 2):
        if d is None:
            weights.append(None)
            continue
        d = units.symmetrized(d, k) if m > 1 else d
        d = em.expand(units.align(d, k, len(shape)), [m] * k + shape)
        weights.append(em.mul(d, vbar))
    return weights


def _seeded(ctx: DeriveContext, jet: Jet, k: int, rank: int) -> fx.Node | None:
    """``D^k`` of an argument over every seed, its seed axes flattened and its value dims
    right-aligned to ``rank``: ``(S^k,) + shape`` with broadcast dims of size 1 (None where
    it is zero)."""
    em, size = ctx.em, ctx.full_size
    d = ctx.fit(jet, (0, size)).d(k)
    if d is None:
        return None
    while d.target is aten.expand.default and em.rank(d.args[0]) == em.rank(d):
        d = d.args[0]  # broadcast again where it is multiplied: a constant stays small
    d = ctx.align(d, k, rank)
    return em.reshape(d, [size ** k, *em.shape(d)[k:]])


def _outer(em: Emitter, a: fx.Node, b: fx.Node) -> fx.Node:
    """``a[s] * b[t]`` for ``(S,) + shape`` and ``(T,) + shape`` (broadcasting, same
    rank): ``(S T,) + shape``."""
    size_a, size_b = em.shape(a)[0], em.shape(b)[0]
    product = em.mul(em.reshape(a, [size_a, 1, *em.shape(a)[1:]]),
                     em.reshape(b, [1, size_b, *em.shape(b)[1:]]))
    return em.reshape(product, [size_a * size_b, *em.shape(product)[2:]])


def _coupled_term(ctx: DeriveContext, node: fx.Node, args: list[Jet], out: fx.Node,
                  vbar: fx.Node, rows: int | None) -> Operand:
    """A coupled node's (a softmax's) local term: its rule's ``D^n`` over every seed with
    its inputs' ``D^n`` zero, weighted by ``vbar`` and summed over its entries (but its
    rows, per example)."""
    em, order = ctx.em, ctx.order
    remainder = _apply_rule(ctx, node, args, out)[order - 1]
    if remainder is None:
        return None
    shape = list(em.shape(out))
    weighted = em.mul(ctx.align(remainder, order, len(shape)), vbar)
    dims = list(range(order + (0 if rows is None else 1), order + len(shape)))
    return em.call(aten.sum.dim_IntList, weighted, dims) if dims else weighted
