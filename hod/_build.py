"""The driver: from a call signature to a generated function, one stage after another.

:func:`build` traces ``f`` over the call's flat tensors (trace, :mod:`hod._tracing`),
splits off a first linear layer when that pays (split, :mod:`hod._split`), chooses the
mode and the seed space (analyze and plan, :mod:`hod._analysis`, :mod:`hod._plan`),
derives the traced graph's outputs (derive, :mod:`hod._derive`), reads the result blocks
from them (assemble, :mod:`hod._assemble`), rewrites the generated graph (passes,
:mod:`hod.passes`), and makes its code (codegen, :mod:`hod._codegen`; compile,
:mod:`hod._compiled`). The records passed between the stages are in :mod:`hod._records`.

Two ways to reach an order-``n`` derivative, chosen by :func:`~hod._plan.choose_mode`:

* **forward**: seed the differentiated inputs and push ``D^1 .. D^n`` through ``f``;
* **reverse-last**: trace the reverse-mode Jacobian ``J = d y / d x`` of ``f`` (for a
  scalar ``y``, its gradient) and push ``D^1 .. D^(n-1)`` through that graph. When the
  output is much smaller than the seed space this costs about ``S^(n-1)`` gradients
  instead of ``S^n`` forward passes.

Where reverse-last would run for the Hessian of a scalar, the **adjoint** driver
(:mod:`hod._adjoint`) is tried first: it sums the Hessian from the local second-order terms
of the curved nodes, paying each forward product once per seed instead of twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import fx
from torch.utils._pytree import TreeSpec, tree_flatten

from ._adjoint import adjoint_hessian
from ._adjoint_top import adjoint_top_order
from ._assemble import block, result_spec, structure, unflattener
from ._codegen import generate
from ._compiled import CompiledCode
from ._derive import derive, seeded_inputs
from ._emitter import Emitter
from ._jet import DeriveContext
from ._plan import (
    choose_mode,
    compact_rows,
    needs,
    plan_reverse,
    plan_seeds,
    row_seeds,
    rows_apart,
)
from ._recompute import Recomputed, recomputable
from ._records import BuildState, Derived, FlatCall, Mode, Request, SeedPlan, Traced
from ._row_blocks import completed
from ._signature import flatten_call
from ._split import Composition, Split, first_layer, graph_after, inner_tensors
from ._tracing import check_outputs, op_call_site, trace_forward
from .errors import HodError, UnsupportedOperatorError
from .passes import rewrite
from .passes.memory import Memory, unwatched


@dataclass
class Lowered:
    """The artifact generated for one signature.

    ``graph_module`` is the generated ``torch.fx.GraphModule`` (a straight line of ATen
    calls over the flat tensor leaves); ``code`` is its Python source; ``mode`` says how
    it differentiates (:class:`~hod._records.Mode`: ``"forward"``, ``"reverse-last"``,
    ``"adjoint"`` (see :mod:`hod._adjoint`), or ``"taylor"`` for the Taylor-mode
    transforms, which it equals as a string);
    ``seed_size`` is the size of the seed space its derivative tensors span (the number
    of directions in Taylor mode). ``planned_module``, when set, is the same code for tensors
    that no transform watches (:func:`~hod.passes.memory.unwatched`), which runs instead:
    on the CPU it writes its large tensors into ``memory`` (see :mod:`hod.passes.memory`),
    and its view chains may be single calls (see :mod:`hod.passes.views`); ``captured``
    are the tensors the code reads besides its inputs. ``compiled``, when set, is
    ``graph_module`` compiled with torch.compile (see :mod:`hod._compiled`); it runs on
    tensors that no transform watches. ``first_layer``, when set, says where the first
    linear layer that was split off reads its inputs (see :mod:`hod._split`): the code
    then takes ``h = X @ W`` before ``f``'s flat tensors. ``examples``, when set, says the
    code is the batched code for a call under ``torch.func.vmap`` (see :mod:`hod._vmap`):
    it takes and returns the ``examples`` examples along dim 0. ``coloured``, when set,
    computes the same result from the call's arguments with one tangent per colour of the
    derivative's sparsity pattern (see :class:`hod._sparse.ColouredDense`); it runs instead
    on tensors that no transform watches.
    """

    graph_module: fx.GraphModule
    result_spec: TreeSpec
    mode: Mode
    seed_size: int
    planned_module: fx.GraphModule | None = None
    memory: Memory | None = None
    compiled: CompiledCode | None = None
    captured: list[torch.Tensor] = field(default_factory=list)
    first_layer: Split | None = None
    examples: int | None = None
    coloured: Callable[[tuple, dict, tuple], object] | None = None
    _unflatten: Callable[[Sequence[object]], object] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._unflatten = unflattener(self.result_spec)

    @property
    def code(self) -> str:
        return self.graph_module.code

    def results(self, tensors: Sequence[torch.Tensor]) -> object:
        """What the transformed function returns for these flat input tensors."""
        return self._unflatten(self.run(tensors))

    def run(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The flat results for these flat input tensors."""
        if self.first_layer is not None:
            tensors = inner_tensors(tensors, self.first_layer)
        # ``forward`` directly: the generated module has no hooks, so skip Module.__call__.
        if self.compiled is not None and self.compiled.usable(tensors):
            return self.compiled(tensors)
        if unwatched(tensors) and unwatched(self.captured):
            return self._planned(tensors)
        if recomputable(tensors, self.captured):
            watched = [t for t in self.captured if t.requires_grad]
            return list(Recomputed.apply(self._planned, self.graph_module.forward,
                                         len(tensors), *tensors, *watched))
        return self.graph_module.forward(*tensors)

    def _planned(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The planned code's results on tensors nothing watches (the plain code's without
        a planned variant, or while another thread runs it)."""
        fast, memory = self.planned_module, self.memory
        if fast is None:
            return self.graph_module.forward(*tensors)
        if memory is None:
            return fast.forward(*tensors)
        if memory.lock.acquire(blocking=False):
            try:
                return fast.forward(*tensors, *memory.tensors())
            finally:
                memory.lock.release()
        return self.graph_module.forward(*tensors)


def build(request: Request, flat: FlatCall, compose: Composition | None = None) -> Lowered:
    """Generate the function computing ``request`` for calls shaped like ``flat``.

    When reverse-last is planned but the gradient graph holds an op without a rule, or
    torch cannot trace its backward (some fused cells, such as ``GRUCell``, fail inside
    functionalization), forward mode is tried before giving up. A first linear layer is
    split off when it can be (see :mod:`hod._split`); ``compose`` is given when building
    the rest of ``f``, ``g``, and turns its blocks into ``f``'s.
    """
    forward = trace_forward(request, flat)
    out_vals = [n.meta["val"] for n in forward.outputs()[: forward.n_out]]
    check_outputs(out_vals, request.call)
    state = BuildState(request, flat, forward, out_vals)
    split = None if compose is not None or flat.rows is not None else first_layer(state)
    if split is not None:
        try:
            return _build_split(state, split)
        except HodError:
            pass  # built without the split, the error names f's own line (see find_call_site)
    shapes = [tuple(flat.tensors[pos].shape) for pos in flat.diff]
    outputs = list(range(forward.n_out))
    if flat.rows is None:
        seeds = plan_seeds(forward.gm, flat.diff, shapes, lambda batch: outputs)
        out_sizes = [v.numel() for v in out_vals]
    else:
        seeds = row_seeds(shapes, [0] * len(forward.outputs()))
        out_sizes = [v.numel() // flat.rows for v in out_vals]
    try:
        top = adjoint_top_order(state, shapes, seeds) if compose is None else None
    except UnsupportedOperatorError:  # a rule without the derivatives it needs here
        top = None
    if top is not None:
        em, spec, size = top
        return lower(state, em, Mode.ADJOINT, size, spec)
    if choose_mode(request.order, out_sizes, seeds.size) is Mode.FORWARD:
        return _generate(state, Mode.FORWARD, forward, seeds, compose)
    try:
        adjoint = adjoint_hessian(state, shapes) if compose is None else None
        if adjoint is not None:
            em, spec, size = adjoint
            return lower(state, em, Mode.ADJOINT, size, spec)
        reverse, reverse_seeds = plan_reverse(state, shapes)
        return _generate(state, Mode.REVERSE_LAST, reverse, reverse_seeds, compose)
    except (UnsupportedOperatorError, RuntimeError) as reverse_error:
        try:
            return _generate(state, Mode.FORWARD, forward, seeds, compose)
        except UnsupportedOperatorError as forward_error:
            raise forward_error from reverse_error


def _generate(
    state: BuildState, mode: Mode, traced: Traced, seeds: SeedPlan,
    compose: Composition | None = None,
) -> Lowered:
    """Derive ``traced`` in ``mode`` over ``seeds`` and assemble the result blocks."""
    request, flat, forward = state.request, state.flat, state.forward
    example = flat.tensors[flat.diff[0]]
    em = Emitter(
        example.device, example.dtype, request.memory_limit, request.call,
        compiling=request.compile is not None,
    )
    fwd_order = request.order if mode is Mode.FORWARD else request.order - 1
    ctx = DeriveContext(em, fwd_order, seeds.size)
    inputs = seeded_inputs(em, flat, seeds, fwd_order)
    n_diff = len(traced.outputs()) - traced.n_aux
    out_jets = derive(
        traced.gm, ctx, inputs, call=request.call, call_site=op_call_site(request, flat),
        needs=needs(mode, n_diff, seeds),
    )
    if ctx.grouped:  # see DeriveContext: the top order is exact once symmetrized
        for jet in {id(j): j for j in out_jets[:n_diff]}.values():
            jet.derivs[-1] = ctx.symmetrized(jet.derivs[-1], fwd_order)
    if seeds.pieces:
        out_jets = completed(em, out_jets, seeds)
        n_diff -= sum(len(p.sizes) for p in seeds.pieces)
    keys, specs = structure(
        forward.out_spec, forward.n_out, request.argnums, flat.layouts, request.orders
    )
    compact = compose is not None and compact_rows(mode, seeds, compose.h_leaf)
    leaf_dtypes = [flat.tensors[pos].dtype for pos in flat.diff]
    derived = Derived(mode, seeds, out_jets, state.out_vals, leaf_dtypes)
    compact_leaf = compose.h_leaf if compact else None
    results = [block(em, key, derived, compact=compact_leaf) for key in keys]
    aux = [j.primal for j in out_jets[n_diff:]]
    if compose is not None:
        per_example = compact or rows_apart(
            mode, traced, flat.diff, seeds, h=compose.h_leaf, n_diff=n_diff
        )
        primals = [jet.primal for jet in inputs]
        results = compose(em, primals, results, per_example=per_example, compact=compact)
    em.output(results + aux)
    spec = result_spec(specs, request, traced.aux_spec)
    return lower(state, em, mode, seeds.size, spec)


def lower(state: BuildState, em: Emitter, mode: Mode, seed_size: int, spec: TreeSpec) -> Lowered:
    """The emitted graph as code: through the passes and codegen, then compiled when
    the request asks for it."""
    request, flat = state.request, state.flat
    if request.compile is not None:  # the compiler plans memory itself
        rewritten = rewrite(em.graph, em.constants, em.device, plan_memory=False)
        gm = generate(rewritten, em.constants, em.device)[0]
        compiled = CompiledCode(gm, request.compile, request.call, list(em.constants.values()))
        return Lowered(gm, spec, mode, seed_size, compiled=compiled, examples=flat.rows)
    captured = list(em.constants.values())
    probe = None if request.allow_random or not unwatched(flat.tensors) else flat.tensors
    rewritten = rewrite(em.graph, em.constants, em.device, probe=probe)
    gm, planned = generate(rewritten, em.constants, em.device)
    return Lowered(gm, spec, mode, seed_size, planned, rewritten.memory, captured=captured,
                   examples=flat.rows)


def _build_split(state: BuildState, split: Split) -> Lowered:
    """Generate ``g``'s derivatives of orders ``0..n`` w.r.t. ``h`` and ``f``'s other
    leaves, composed into ``f``'s blocks in the same code."""
    request, flat, forward = state.request, state.flat, state.forward
    g = graph_after(forward.gm, split)
    examples = inner_tensors(flat.tensors, split)
    inner_argnums = (0,) + tuple(1 + pos for pos in flat.diff if pos not in (split.x, split.w))
    inner_request = replace(
        request, f=lambda h, *tensors: tuple(g(*tensors, h)), argnums=inner_argnums,
        with_values=True,
    )
    inner_flat = flatten_call(tuple(examples), {}, inner_argnums, request.call)
    n_out = forward.n_out
    inner_spec = tree_flatten(tuple(range(n_out)))[1]
    inner_keys = structure(
        inner_spec, n_out, inner_argnums, inner_flat.layouts, inner_request.orders
    )[0]
    keys, specs = structure(
        forward.out_spec, n_out, request.argnums, flat.layouts, request.orders
    )
    composition = Composition(
        split, tuple(keys),
        mapping=tuple(None if pos in (split.x, split.w) else inner_flat.diff.index(1 + pos)
                      for pos in flat.diff),
        inner_keys=tuple(inner_keys),
        h_leaf=inner_flat.diff.index(0),
        leaf_shapes=tuple(tuple(flat.tensors[pos].shape) for pos in flat.diff),
        out_ranks=tuple(v.dim() for v in state.out_vals),
    )
    inner = build(inner_request, inner_flat, composition)
    return replace(inner, result_spec=result_spec(specs, request, None), first_layer=split)
