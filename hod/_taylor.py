"""The Taylor-mode driver: from a call signature to generated code pushing jets through f.

:func:`build_taylor` traces ``f`` (or its gradient, for Hessian-vector products), gives
each differentiated input leaf its input Taylor coefficients (from the call, or
directions over the seed space chosen at trace time), derives every node's coefficients
with :class:`~hod._jet.TaylorContext` (collapsing the top one over the directions when
asked, :mod:`hod._collapse`), and lowers the graph like :mod:`hod._build` does.

The generated function returns a tuple with one tree like ``f``'s output per coefficient
order named in ``plan.returns`` (0: the value; ``k``: ``c_k`` of shape
``(R,) + out.shape``, or ``out.shape`` for a collapsed top), then, with ``plan.gradient``,
the Jacobian like :func:`hod.jacobian`'s. For a Hessian-vector product (``reverse``) it
returns ``H v`` like :func:`hod.jacobian` of the loss.

A ``chunked`` plan's code covers ``c`` of its ``R`` directions per call, the rows its last
argument names (:class:`~hod._records.TaylorPlan`); its ``Lowered.seed_size`` is ``R``, so
that the caller learns how many directions to cut into chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

from ._assemble import block, structure
from ._build import Lowered, lower
from ._collapse import Collapse
from ._derive import derive, seeded_inputs
from ._emitter import Emitter, Operand
from ._jet import TaylorContext
from ._plan import plain_segments, plan_seeds, row_seeds
from ._records import (
    BuildState,
    Derived,
    FlatCall,
    Jet,
    Mode,
    Request,
    SeedPlan,
    TaylorPlan,
    Traced,
)
from ._tracing import check_outputs, op_call_site, trace_forward, trace_reverse
from .errors import MemoryLimitError, OutputError


def build_taylor(
    request: Request, flat: FlatCall, plan: TaylorPlan,
    hint: Callable[[MemoryLimitError, int], MemoryLimitError] | None = None,
) -> Lowered:
    """Generate the function computing ``plan`` for calls shaped like ``flat``.

    ``hint(error, R)`` is raised instead of a :class:`~hod.MemoryLimitError` met while
    deriving along ``R`` directions (a message that suggests cutting them)."""
    forward = trace_forward(request, flat)
    out_vals = [n.meta["val"] for n in forward.outputs()[: forward.n_out]]
    check_outputs(out_vals, request.call)
    state = BuildState(request, flat, forward, out_vals)
    traced, outputs = forward, list(range(forward.n_out))
    if plan.reverse:
        _check_loss(request.call, out_vals, flat.rows)
        traced = trace_reverse(request, flat, forward)
        outputs = list(range(1, 1 + len(flat.diff)))
    example = flat.tensors[flat.diff[0]]
    em = Emitter(example.device, example.dtype, request.memory_limit, request.call,
                 compiling=request.compile is not None)
    inputs, seeds, weights, total = _inputs(em, flat, plan, traced)
    identity = plan.basis is None and not plan.series and not plan.chunked
    directions = seeds.size if identity else _rows(em, inputs, flat)
    collapse = None
    if plan.collapse is not None:
        collapse = Collapse(TaylorContext(em, plan.order, 1), weights)
    needs = [(0, directions) if i in outputs else None for i in range(len(traced.outputs()))]
    try:  # a tensor over the directions past the limit: the caller may suggest a chunk
        out_jets = derive(
            traced.gm, TaylorContext(em, plan.order, directions), inputs, call=request.call,
            call_site=op_call_site(request, flat), needs=needs, collapse=collapse,
        )
        if plan.reverse:
            results, spec = _hvp_results(em, state, out_jets, outputs, directions, plan)
        else:
            results, spec = _results(em, state, plan, out_jets, seeds, directions)
        em.output(results)
        return lower(state, em, Mode.TAYLOR, total or directions, spec)
    except MemoryLimitError as error:
        raise (error if hint is None else hint(error, directions)) from None


def _hvp_results(
    em: Emitter, state: BuildState, out_jets: list[Jet], outputs: list[int], directions: int,
    plan: TaylorPlan,
) -> tuple[list[fx.Node], TreeSpec]:
    """``H v``, shaped like the differentiated leaves, laid out like a gradient."""
    request, flat = state.request, state.flat
    results = [em.reshape(_coefficient(em, out_jets[i], 1, directions, plan),
                          list(flat.tensors[pos].shape))
               for i, pos in zip(outputs, flat.diff, strict=True)]
    spec = structure(state.forward.out_spec, 1, request.argnums, flat.layouts, range(1, 2))
    return results, spec[1][0]


def _check_loss(call: str, out_vals: list[torch.Tensor], rows: int | None) -> None:
    if len(out_vals) != 1 or out_vals[0].numel() != (rows or 1):
        shapes = [tuple(v.shape)[1 if rows else 0:] for v in out_vals]
        raise OutputError(
            f"{call}: the function must return a single-element tensor (a loss), got "
            f"{shapes[0] if len(shapes) == 1 else shapes}.\n  Fix: reduce it, e.g. return "
            f"loss.sum(), or use hod.jet for directional derivatives of it."
        )


def _results(
    em: Emitter, state: BuildState, plan: TaylorPlan, out_jets: list[Jet], seeds: SeedPlan,
    directions: int,
) -> tuple[list[fx.Node], TreeSpec]:
    """Per order in ``plan.returns`` the coefficients of every output (a tree like ``f``'s
    output), then the Jacobian when ``plan.gradient``; and the spec of that tuple."""
    forward = state.forward
    trees, results = [], []
    for k in plan.returns:
        coefficients = [_coefficient(em, out_jets[i], k, directions, plan)
                        for i in range(forward.n_out)]
        if state.flat.rows is not None:
            coefficients = [_examples_first(em, c, k, plan) for c in coefficients]
        trees.append(tree_unflatten([_Leaf()] * len(coefficients), forward.out_spec))
        results += coefficients
    if plan.gradient:
        blocks, spec = _gradient_blocks(em, state, seeds, out_jets[: forward.n_out])
        trees.append(tree_unflatten([_Leaf()] * len(blocks), spec))
        results += blocks
    return results, tree_flatten(tuple(trees))[1]


class _Leaf:
    """A placeholder leaf for building the result's tree spec."""


def _inputs(
    em: Emitter, flat: FlatCall, plan: TaylorPlan, traced: Traced
) -> tuple[list[Jet], SeedPlan, fx.Node | None, int | None]:
    """The jets of the call's flat tensors, the seed plan directions were laid on, the
    collapse weights (None: all one) and, for a ``chunked`` plan, the number ``R`` of
    directions its chunks cover (else None)."""
    shapes = [tuple(flat.tensors[pos].shape) for pos in flat.diff]
    seeds = SeedPlan(tuple(plain_segments(shapes)), ())
    if plan.series:
        return (*_series_inputs(em, flat, plan, seeds), None)
    if flat.rows is not None:
        seeds = row_seeds(shapes, [0] * len(traced.outputs()))
    elif plan.compress:
        outputs = list(range(traced.n_out))
        seeds = plan_seeds(traced.gm, flat.diff, shapes, lambda batch: outputs)
    if plan.basis is None and not plan.chunked:
        weights = _weights(em, flat, plan, seeds)
        return seeded_inputs(em, flat, seeds, plan.order), seeds, weights, None
    inputs = _unseeded(em, flat, seeds, plan.order)
    basis, weights, total = _directions(em, flat, plan, seeds, inputs)
    for leaf, segment in zip(flat.diff, seeds.segments, strict=True):
        part = em.call(torch.ops.aten.slice.Tensor, basis, 1, segment.offset,
                       segment.offset + segment.size)
        rows = em.shape(basis)[0]
        kept = list(segment.shape)
        if segment.batch_dim is not None:
            kept[segment.batch_dim] = 1  # one row's directions, repeated over the batch
        along = em.reshape(part, [rows, *kept])
        derivs = [em.expand(along, [rows, *segment.shape])] + [None] * (plan.order - 1)
        inputs[leaf] = Jet(inputs[leaf].primal, derivs)
    return inputs, seeds, weights, total


def _weights(em: Emitter, flat: FlatCall, plan: TaylorPlan, seeds: SeedPlan) -> fx.Node | None:
    """The collapse weights of a plan whose directions are fixed at trace time."""
    weights = None if plan.collapse is None else plan.collapse(seeds.size)
    return None if weights is None else em.constant("weights", weights.to(_like(flat)))


def _directions(
    em: Emitter, flat: FlatCall, plan: TaylorPlan, seeds: SeedPlan, inputs: list[Jet]
) -> tuple[fx.Node, fx.Node | None, int]:
    """The directions ``(R, S)`` of a basis plan and its collapse weights, or, when
    ``chunked``, the rows of both that the call's last argument names, ``(c, S)``, and
    ``R`` (else None)."""
    aten = torch.ops.aten
    full = None if plan.basis is None else plan.basis(seeds.size).to(_like(flat))
    if not plan.chunked:
        return em.constant("directions", full), _weights(em, flat, plan, seeds), None
    rows = inputs[_argument(flat, -1)].primal
    total = seeds.size if full is None else len(full)
    if full is None:  # the identity: row r is one at coordinate r (none for r >= S)
        coordinates = em.constant("coordinates", torch.arange(seeds.size,
                                                              device=_like(flat).device))
        hits = em.call(aten.eq.Tensor, em.reshape(rows, [-1, 1]), coordinates)
        basis = em.call(aten._to_copy.default, hits, dtype=_like(flat).dtype)
    else:
        basis = em.call(aten.index_select.default,
                        em.constant("directions", with_zero_row(full)), 0, rows)
    weights = None if plan.collapse is None else plan.collapse(seeds.size)
    if weights is not None:
        padded = with_zero_row(weights.to(_like(flat)))
        weights = em.call(aten.index_select.default, em.constant("weights", padded), 0, rows)
    return basis, weights, total


def with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """``t`` with one more row of zeros: what a chunk's padding index selects."""
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


def _like(flat: FlatCall) -> torch.Tensor:
    """The first differentiated leaf: the dtype and device of directions and weights."""
    return flat.tensors[flat.diff[0]]


def _series_inputs(
    em: Emitter, flat: FlatCall, plan: TaylorPlan, seeds: SeedPlan
) -> tuple[list[Jet], SeedPlan, fx.Node | None]:
    """The jets of a ``series`` plan's flat tensors, with the input coefficients the
    call passes, and the collapse weights it passes (``call_weights``)."""
    inputs = _unseeded(em, flat, seeds, plan.order)
    series = _argument(flat, -plan.trailing)
    weights = _argument(flat, -1) if plan.call_weights else None
    for leaf, coefficients in zip(flat.diff, series, strict=True):
        derivs: list[Operand] = [inputs[pos].primal for pos in coefficients]
        inputs[leaf] = Jet(inputs[leaf].primal, derivs + [None] * (plan.order - len(derivs)))
    return inputs, seeds, None if weights is None else inputs[weights].primal


def _unseeded(em: Emitter, flat: FlatCall, seeds: SeedPlan, order: int) -> list[Jet]:
    """The call's flat tensors as placeholders, without derivatives yet."""
    return [Jet(j.primal, [None] * order) for j in seeded_inputs(em, flat, seeds, 0)]


def _argument(flat: FlatCall, index: int) -> Any:
    """Positional argument ``index`` of the call (one the plan takes: a series, weights,
    a chunk's rows) with each tensor replaced by its position in ``flat.tensors``."""
    args, _ = flat.rebuild(list(flat.tensors))
    position = {id(t): i for i, t in reversed(list(enumerate(flat.tensors)))}
    return tree_map(lambda t: position[id(t)], args[index])


def _rows(em: Emitter, inputs: list[Jet], flat: FlatCall) -> int:
    """``R`` when every differentiated leaf carries all directions: the leading size of
    their coefficients (the identity directions give each leaf its own span of them)."""
    for pos in flat.diff:
        for d in inputs[pos].derivs:
            if isinstance(d, fx.Node):
                return em.shape(d)[0]
    raise AssertionError("no direction reaches a differentiated input")


def _coefficient(em: Emitter, jet: Jet, k: int, directions: int, plan: TaylorPlan) -> fx.Node:
    """Coefficient ``k`` of an output: ``(R,) + out.shape``, ``out.shape`` when it is the
    collapsed top; zeros when it is a symbolic zero."""
    shape = list(em.shape(jet.primal))
    if k == 0:
        return jet.primal
    collapsed = plan.collapse is not None and k == plan.order
    value = jet.d(k)
    if value is None:
        return em.zeros(shape if collapsed else [directions, *shape], em.dtype_of(jet.primal))
    if collapsed:
        return em.reshape(value, shape)
    lo, hi = jet.span or (0, directions)
    if (lo, hi) != (0, directions):
        value = em.call(torch.ops.aten.constant_pad_nd.default, value,
                        [0, 0] * len(shape) + [lo, directions - hi], 0.0)
    return value


def _examples_first(em: Emitter, coefficient: fx.Node, k: int, plan: TaylorPlan) -> fx.Node:
    """A coefficient of a call holding examples (``FlatCall.rows``) with the examples
    first: ``(N, R) + ...`` for ``(R, N) + ...``; a value or collapsed top has them first."""
    if k == 0 or (plan.collapse is not None and k == plan.order):
        return coefficient
    return em.call(torch.ops.aten.movedim.int, coefficient, 1, 0)


def _gradient_blocks(
    em: Emitter, state: BuildState, seeds: SeedPlan, out_jets: list[Jet]
) -> tuple[list[fx.Node], TreeSpec]:
    """The Jacobian blocks ``d out / d leaf`` from the first coefficients along the
    identity directions, and their tree spec, as :func:`hod.jacobian` lays them out."""
    request, flat, forward = state.request, state.flat, state.forward
    keys, specs = structure(forward.out_spec, forward.n_out, request.argnums, flat.layouts,
                            range(1, 2))
    leaf_dtypes = [flat.tensors[pos].dtype for pos in flat.diff]
    derived = Derived(Mode.FORWARD, seeds, out_jets, state.out_vals, leaf_dtypes)
    return [block(em, key, derived) for key in keys], specs[0]
