"""Derive stage: walk a traced ATen graph and emit every node's derivative tensors.

Each node of the traced graph is copied into the emitter's graph (its value) and, when
one of its inputs has a nonzero derivative, its rule emits ``D^1 .. D^n`` of it over the
seed space. Nodes that depend on no seeded input cost nothing beyond their value.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx

from ._analysis import covered_span, needed_spans
from ._collapse import Collapse
from ._emitter import Emitter, Operand, delta_strides, row_major
from ._jet import DeriveContext
from ._records import FlatCall, Jet, SeedPlan, Segment, Span
from .errors import UnsupportedOperatorError
from .rules import RULES

aten = torch.ops.aten

#: ``site(op)`` returns where the user's function called ``op`` (for error messages).
CallSite = Callable[[object], "str | None"]


def derive(
    gm: fx.GraphModule,
    ctx: DeriveContext,
    inputs: Sequence[Jet],
    *,
    call: str,
    call_site: CallSite,
    needs: Sequence[Span | None],
    collapse: Collapse | None = None,
) -> list[Jet]:
    """Jets of ``gm``'s outputs, given the jets of its placeholders (in order).

    ``needs[i]`` is the range of seeds whose derivatives output ``i`` must carry (None:
    none, a value only; outputs past ``needs`` are values too, such as aux outputs).
    Every node computes its derivatives over the seeds some output needs from it.
    With ``collapse`` (Taylor mode), every node's top coefficient is collapsed over the
    directions (see :mod:`hod._collapse`), and so is the outputs' ``D^K``.
    """
    em = ctx.em
    env: dict[fx.Node, object] = {}
    outputs = list(gm.graph.nodes)[-1].args[0]
    needed = needed_spans(outputs, needs)
    placeholders = iter(inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            jet = next(placeholders)
            env[node] = jet if collapse is None else collapse.leaf(jet)
        elif node.op == "get_attr":
            value = getattr(gm, node.target)
            env[node] = Jet(em.constant(node.target, value), [None] * ctx.order)
        elif node.op == "call_function" and node.target is operator.getitem:
            env[node] = env[node.args[0]][node.args[1]]  # one output of a multi-output op
        elif node.op == "call_function":
            env[node] = _narrowed_seed(ctx, node, env, needed.get(node)) or _derive_node(
                ctx, node, env, call, call_site, needed.get(node), collapse
            )
        elif node.op == "output":
            jets = [env[v] for v in node.args[0]]
            return jets if collapse is None else [collapse.output(j) for j in jets]
    raise AssertionError("graph without output")


def seeded_inputs(em: Emitter, flat: FlatCall, seeds: SeedPlan, order: int) -> list[Jet]:
    """The jets of the call's flat tensors, placeholders of the generated graph: a
    differentiated leaf (when ``order > 0``) carries ``D^1`` over its own segment of seeds."""
    inputs = []
    for i, t in enumerate(flat.tensors):
        node = em.placeholder(f"t{i}", t)
        derivs: list[Operand] = [None] * order
        span = None
        if i in flat.diff and order > 0:
            segment = seeds.segments[flat.diff.index(i)]
            derivs[0] = _seed(em, segment, node)
            span = (segment.offset, segment.offset + segment.size)
        inputs.append(Jet(node, derivs, span))
    return inputs


def _seed(em: Emitter, segment: Segment, like: fx.Node) -> fx.Node:
    """``D^1`` of an input leaf over its own segment of seeds, ``(size,) + shape``.

    The identity: seed ``s`` is one at coordinate ``s``. A compressed leaf's seeds are the
    identity over its within-slice coordinates, repeated along its batch dim.
    """
    size = segment.size
    if segment.batch_dim is None:
        return em.seed_identity(size, segment.shape, like)
    shape = list(segment.shape)
    shape[segment.batch_dim] = 1
    return em.expand(em.reshape(em.eye(size, like), [size, *shape]), [size, *segment.shape])


def _derive_node(
    ctx: DeriveContext, node: fx.Node, env: dict, call: str, call_site: CallSite,
    needed: Span | None, collapse: Collapse | None,
) -> Jet | tuple[Jet, ...]:
    """The node's Jet; for an op returning several tensors, a tuple of Jets (one each).

    A multi-output op's rule gets ``out`` as the tuple of its outputs' nodes and returns
    one derivative list per output (``None`` for an output without derivatives).
    """
    em = ctx.em
    args = fx.node.map_aggregate(node.args, lambda a: env[a] if isinstance(a, fx.Node) else a)
    kwargs = fx.node.map_aggregate(
        node.kwargs, lambda a: env[a] if isinstance(a, fx.Node) else a
    )
    primal = fx.node.map_aggregate(args, _primal)
    primal_kwargs = fx.node.map_aggregate(kwargs, _primal)
    out = em.call(node.target, *primal, **dict(primal_kwargs))
    jets = [a for a in _flat(args) + _flat(kwargs) if isinstance(a, Jet)]
    val = out.meta["val"]
    if val is None:  # an op run for its checks only, such as _linalg_check_errors
        return Jet(out, [None] * ctx.order)
    multi = isinstance(val, (tuple, list)) and all(
        isinstance(v, torch.Tensor) or v is None for v in val
    )
    if not isinstance(val, torch.Tensor) and not multi:
        raise UnsupportedOperatorError(
            f"{call}: the ATen op {node.target} returns {type(val).__name__}, not a tensor; "
            f"hod differentiates tensor ops only.{_where(call_site, node.target)}"
        )
    if multi:  # outputs that are None (masked off) get no node
        outs = tuple(None if v is None else em.call(operator.getitem, out, i)
                     for i, v in enumerate(val))
    else:
        outs = (out,)
    floating = any(o is not None and em.dtype_of(o).is_floating_point for o in outs)
    per_output: list = [None] * len(outs)
    topped = collapse is not None and any(collapse.tops.get(j.primal) is not None for j in jets)
    derived = needed is not None and floating
    rule = _rule(node, call, call_site) if derived and (topped or not _constant(jets)) else None

    def run(rule_ctx: DeriveContext, rule_args: tuple, rule_kwargs: dict) -> list:
        derivs = rule(rule_ctx, rule_args, rule_kwargs, outs if multi else out)
        return derivs if multi else [derivs]

    span = None if rule is None or _constant(jets) else _common_span(ctx, jets, needed)
    if span is not None:
        ctx.enter(span)
        per_output = run(ctx, _fitted(ctx, args, span), _fitted(ctx, kwargs, span))
    jets_out = tuple(
        _output_jet(em, ctx, o, d, node) for o, d in zip(outs, per_output, strict=True)
    )
    if collapse is not None and derived:
        top_ctx = collapse.ctx
        collapse.node(
            args, kwargs, jets_out, run if rule is not None else None,
            lambda d, o: _conform(em, top_ctx, d, top_ctx.order, o, node),
        )
    return jets_out if multi else jets_out[0]


def _narrowed_seed(
    ctx: DeriveContext, node: fx.Node, env: dict, needed: Span | None
) -> Jet | tuple[Jet, ...] | None:
    """Rows of a leaf seeded by the identity (``aten.slice`` or ``aten.split`` along dim 0):
    the identity over their own seeds alone, with that narrower span.

    A flat parameter vector split into a model's weights gives each weight a slice of the
    vector's identity seeds; narrowed, each weight's seeds are its own, and products with
    them are placements (see :func:`~hod._emitter.delta_strides`) over its span only. A
    slice of more than half the leaf keeps the whole span: shifted slices combined
    elementwise (``x[1:] - x[:-1]``) would only be padded back to it.
    """
    splits = (aten.split_with_sizes.default, aten.split.Tensor)
    if (node.target is not aten.slice.Tensor and node.target not in splits) or needed is None \
            or type(ctx) is not DeriveContext:  # Taylor mode's directions are not seeds
        return None
    x = env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    leaf = _identity_seeded(ctx, x)
    if leaf is None:
        return None
    em, (lo, shape) = ctx.em, leaf
    inner = math.prod(shape[1:])
    if node.target in splits:
        sizes, dim = node.args[1], (node.args[2] if len(node.args) > 2 else 0)
        if dim != 0:
            return None
        if isinstance(sizes, int):
            sizes = [min(sizes, shape[0] - i) for i in range(0, shape[0], sizes)]
        parts = em.call(node.target, x.primal, *node.args[1:])
        jets, start = [], 0
        for i, size in enumerate(sizes):
            piece = em.call(operator.getitem, parts, i)
            jets.append(_identity_jet(ctx, piece, lo + start * inner, size * inner))
            start += size
        return tuple(jets)
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    if dim != 0 or step != 1:
        return None
    start, end, _ = slice(start, end).indices(shape[0])
    if not 0 < 2 * (end - start) <= shape[0]:
        return None  # most of the leaf (x[1:] against x[:-1]): padding spans costs more
    primal = em.call(aten.slice.Tensor, x.primal, *node.args[1:])
    return _identity_jet(ctx, primal, lo + start * inner, (end - start) * inner)


def _identity_seeded(ctx: DeriveContext, x: object) -> tuple[int, list[int]] | None:
    """``(first seed, shape)`` of a jet whose only derivative is a row-major identity seed."""
    if (not isinstance(x, Jet) or not x.derivs or x.derivs[0] is None
            or any(d is not None for d in x.derivs[1:]) or x.narrow is not None):
        return None
    shape = list(ctx.em.shape(x.primal))
    strides = delta_strides(x.derivs[0])
    if not shape or strides != row_major(shape):
        return None
    return ctx.span_of(x)[0], shape


def _identity_jet(ctx: DeriveContext, primal: fx.Node, first: int, seeds: int) -> Jet:
    derivs = [ctx.em.seed_identity(seeds, ctx.em.shape(primal), primal)]
    return Jet(primal, derivs + [None] * (ctx.order - 1), (first, first + seeds))


def _constant(jets: list[Jet]) -> bool:
    return all(j.is_constant for j in jets)


def _rule(node: fx.Node, call: str, call_site: CallSite):
    """The node's derivative rule; a clear error when hod has none."""
    rule = RULES.get(node.target)
    if rule is None:
        raise UnsupportedOperatorError(
            f"{call}: no derivative rule for the ATen op {node.target}.\n"
            f"  Expected: ops listed in hod's docs, docs/operators.md (or ones that "
            f"decompose into them)."
            f"{_where(call_site, node.target)}\n"
            f"  Fix: rewrite that line with supported ops, or open an issue asking for a "
            f"rule for {node.target}."
        )
    return rule


def _common_span(ctx: DeriveContext, jets: list[Jet], needed: Span) -> Span | None:
    return covered_span([ctx.span_of(j) for j in jets if not j.is_constant], needed)


def _fitted(ctx: DeriveContext, value: object, span: Span):
    """``value`` (args or kwargs) with every jet fitted to ``span``."""
    return fx.node.map_aggregate(value, lambda v: ctx.fit(v, span) if isinstance(v, Jet) else v)


def _output_jet(
    em: Emitter, ctx: DeriveContext, out: fx.Node | None, derivs: list | None, node: fx.Node
) -> Jet | None:
    """One output's Jet (None for an output the op did not compute)."""
    if out is None:
        return None
    if derivs is None:
        return Jet(out, [None] * ctx.order)
    conformed = [_conform(em, ctx, d, k, out, node) for k, d in enumerate(derivs, 1)]
    return Jet(out, conformed, ctx.span)


def _where(call_site: CallSite, op: object) -> str:
    site = call_site(op)
    return f"\n  It comes from: {site}" if site else ""


def _primal(value: object) -> object:
    return value.primal if isinstance(value, Jet) else value


def _flat(value: object) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    return [value]


def _conform(
    em: Emitter, ctx: DeriveContext, d: Operand, k: int, out: fx.Node, node: fx.Node
) -> Operand:
    """Check a rule's ``D^k`` has shape ``(S,)*k + out.shape``, expanding a broadcast one."""
    if d is None:
        return None
    expected = ctx.lead(k) + list(em.shape(out))
    if not isinstance(d, fx.Node):
        raise AssertionError(f"rule for {node.target} returned a number for D^{k}")
    if list(em.shape(d)) != expected:
        d = em.expand(ctx.align(d, k, em.rank(out)), expected)
    if em.dtype_of(d) != em.dtype_of(out):
        d = em.call(torch.ops.aten._to_copy.default, d, dtype=em.dtype_of(out))
    return d
