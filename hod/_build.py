"""From a call signature to a generated function: trace, plan, derive, assemble, codegen.

Two ways to reach an order-``n`` derivative, chosen by :func:`choose_mode`:

* **forward**: seed the differentiated inputs and push ``D^1 .. D^n`` through ``f``;
* **reverse-last**: trace the reverse-mode Jacobian ``J = d y / d x`` of ``f`` (for a
  scalar ``y``, its gradient) and push ``D^1 .. D^(n-1)`` through that graph. When the
  output is much smaller than the seed space this costs about ``S^(n-1)`` gradients
  instead of ``S^n`` forward passes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import fx
from torch.utils._pytree import TreeSpec, tree_flatten

from ._assemble import block_structure, extract_block, unflattener
from ._codegen import generate
from ._compiled import CompiledCode
from ._cost import derivative_work
from ._derive import derive
from ._emitter import Emitter, Operand
from ._jet import DeriveContext, Jet
from ._memory import Memory, unwatched
from ._per_example import per_example_block, with_per_example_terms
from ._plan import choose_mode, plain_segments, plan_seeds, valid_batch
from ._records import MIXED, BlockKey, FlatCall, Mode, Request, SeedPlan, Segment, Traced
from ._signature import flatten_call, flatten_outputs
from ._split import Composition, Split, find_split, graph_after, inner_tensors
from ._tracing import find_call_site, trace
from .errors import HodError, OutputError, UnsupportedOperatorError

#: Sizes of the derivative tensors of a first linear layer from which it is split off
#: (see :func:`_first_layer`), for Hessians and for higher orders.
SPLIT_MIN_ENTRIES_HESSIAN = 4096
SPLIT_MIN_ENTRIES = 65536


@dataclass
class Lowered:
    """The artifact generated for one signature.

    ``graph_module`` is the generated ``torch.fx.GraphModule`` (a straight line of ATen
    calls over the flat tensor leaves); ``code`` is its Python source; ``mode`` says how
    it differentiates (:class:`~hod._records.Mode`: ``"forward"`` or ``"reverse-last"``,
    which it equals as a string); ``seed_size`` is the size of
    the seed space its derivative tensors span. ``planned_module``, when set, is the same
    code for tensors that no transform watches (:func:`~hod._memory.unwatched`), which
    runs instead: on the CPU it writes its large tensors into ``memory`` (see
    :mod:`hod._memory`), and its view chains may be single calls (see :mod:`hod._views`);
    ``captured`` are the tensors the code reads besides its inputs. ``compiled``, when set, is
    ``graph_module`` compiled with torch.compile (see :mod:`hod._compiled`); it runs on
    tensors that no transform watches. ``first_layer``, when set, says where the first
    linear layer that was split off reads its inputs (see :mod:`hod._split`): the code
    then takes ``h = X @ W`` before ``f``'s flat tensors.
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
        fast, memory = self.planned_module, self.memory
        if fast is not None and unwatched(tensors) and unwatched(self.captured):
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
    forward = _trace_forward(request, flat)
    out_vals = [n.meta["val"] for n in _outputs(forward.gm)[: forward.n_out]]
    _check_outputs(out_vals, request.call)
    split = None if compose is not None else _first_layer(request, flat, forward, out_vals)
    if split is not None:
        try:
            return _build_split(request, flat, forward, out_vals, split)
        except HodError:
            pass  # built without the split, the error names f's own line (see find_call_site)
    shapes = [tuple(flat.tensors[pos].shape) for pos in flat.diff]
    outputs = list(range(forward.n_out))
    seeds = plan_seeds(forward.gm, flat.diff, shapes, lambda batch: outputs)
    if choose_mode(request.order, [v.numel() for v in out_vals], seeds.size) is Mode.FORWARD:
        return _generate(request, flat, forward, out_vals, Mode.FORWARD, forward, seeds, compose)
    try:
        reverse, reverse_seeds = _plan_reverse(request, flat, forward, out_vals, shapes)
        return _generate(
            request, flat, forward, out_vals, Mode.REVERSE_LAST, reverse, reverse_seeds, compose
        )
    except (UnsupportedOperatorError, RuntimeError) as reverse_error:
        try:
            return _generate(
                request, flat, forward, out_vals, Mode.FORWARD, forward, seeds, compose
            )
        except UnsupportedOperatorError as forward_error:
            raise forward_error from reverse_error


def _generate(
    request: Request, flat: FlatCall, forward: Traced, out_vals: list[torch.Tensor],
    mode: Mode, traced: Traced, seeds: SeedPlan, compose: Composition | None = None,
) -> Lowered:
    """Derive ``traced`` in ``mode`` over ``seeds`` and assemble the result blocks."""
    example = flat.tensors[flat.diff[0]]
    em = Emitter(
        example.device, example.dtype, request.memory_limit, request.call,
        compiling=request.compile is not None,
    )
    fwd_order = request.order if mode is Mode.FORWARD else request.order - 1
    ctx = DeriveContext(em, fwd_order, seeds.size)
    leaf_dtypes = [flat.tensors[pos].dtype for pos in flat.diff]
    inputs = []
    for i, t in enumerate(flat.tensors):
        node = em.placeholder(f"t{i}", t)
        derivs: list[Operand] = [None] * fwd_order
        span = None
        if i in flat.diff and fwd_order > 0:
            segment = seeds.segments[flat.diff.index(i)]
            derivs[0] = _seed(em, segment, node)
            span = (segment.offset, segment.offset + segment.size)
        inputs.append(Jet(node, derivs, span))

    def call_site(op: object) -> str | None:
        return find_call_site(_flat_function(request, flat, None), flat.tensors, op)

    n_diff = len(_outputs(traced.gm)) - traced.n_aux
    needs = _needs(mode, n_diff, seeds)
    out_jets = derive(traced.gm, ctx, inputs, request.call, call_site, needs)
    if ctx.grouped:  # see DeriveContext: the top order is exact once symmetrized
        for jet in {id(j): j for j in out_jets[:n_diff]}.values():
            jet.derivs[-1] = ctx.symmetrized(jet.derivs[-1], fwd_order)
    keys, specs = _structure(
        forward.out_spec, forward.n_out, request.argnums, flat.layouts, request.orders
    )
    compact = compose is not None and _compact_rows(mode, seeds, compose.h_leaf)
    results = [
        _block(em, mode, key, out_jets, out_vals, seeds, leaf_dtypes,
               compose.h_leaf if compact else None)
        for key in keys
    ]
    aux = [j.primal for j in out_jets[n_diff:]]
    if compose is not None:
        per_example = compact or _rows_apart(mode, traced, flat, seeds, compose.h_leaf, n_diff)
        results = compose(em, [jet.primal for jet in inputs], results, per_example, compact)
    em.output(results + aux)
    spec = _result_spec(specs, request, traced.aux_spec)
    if request.compile is not None:  # the compiler plans memory itself
        gm = generate(em.graph, em.constants, em.device, plan_memory=False)[0]
        compiled = CompiledCode(gm, request.compile, request.call, list(em.constants.values()))
        return Lowered(gm, spec, mode, seeds.size, compiled=compiled)
    captured = list(em.constants.values())
    probe = None if request.allow_random or not unwatched(flat.tensors) else flat.tensors
    gm, fast, memory = generate(em.graph, em.constants, em.device, probe=probe)
    return Lowered(gm, spec, mode, seeds.size, fast, memory, captured=captured)


def _structure(
    out_spec: TreeSpec, n_out: int, argnums: int | tuple[int, ...],
    layouts: dict, orders: range,
) -> tuple[list[BlockKey], list[TreeSpec]]:
    """The blocks of each order in ``orders``, one after another, and each order's spec."""
    keys, specs = [], []
    for order in orders:
        order_keys, spec = block_structure(out_spec, n_out, argnums, layouts, order)
        keys += order_keys
        specs.append(spec)
    return keys, specs


def _gradients_of(batch: dict[int, int]) -> list[int]:
    """The outputs of a reverse-last graph holding the gradients of the leaves of
    ``batch``: its compressed seeds are read from those (see :func:`_needs`)."""
    return [1 + leaf for leaf in batch]


def _rows_apart(
    mode: Mode, traced: Traced, flat: FlatCall, seeds: SeedPlan, h: int, n_diff: int
) -> bool:
    """Whether the rows of ``g``'s leaf ``h`` are independent examples (``g``'s blocks
    vanish unless their ``h`` slots sit on one row): compressed so, or they could be."""
    required = _gradients_of if mode is Mode.REVERSE_LAST else (lambda batch: range(n_diff))
    return seeds.segments[h].batch_dim == 0 or valid_batch(
        traced.gm, flat.diff, required, {h: 0}
    )


def _compact_rows(mode: Mode, seeds: SeedPlan, h: int) -> bool:
    """Whether ``g``'s blocks can hold one row of ``h`` (``_block``'s ``compact``): in
    reverse-last mode, with ``h`` the one leaf compressed, along its rows."""
    compressed = [i for i, s in enumerate(seeds.segments) if s.batch_dim is not None]
    return mode is Mode.REVERSE_LAST and compressed == [h] and seeds.segments[h].batch_dim == 0


def _first_layer(
    request: Request, flat: FlatCall, forward: Traced, out_vals: list[torch.Tensor]
) -> Split | None:
    """The first linear layer to split off, if ``f`` has one and the request suits: orders
    from 2 (Jacobians are cheap enough), no aux outputs and no random ops (``g`` is
    traced again), and one dtype throughout (the composition does not promote)."""
    if request.order < 2 or request.has_aux or request.allow_random:
        return None
    dtypes = {flat.tensors[pos].dtype for pos in flat.diff} | {v.dtype for v in out_vals}
    if len(dtypes) != 1:
        return None
    split = find_split(forward.gm, flat.diff)
    if split is None:
        return None
    # The split saves passes over the derivative tensors of X @ W and adds composition
    # calls: below these sizes of those tensors (seeds^(order-1) * numel) the calls cost
    # more (measured on the benchmark's MLPs: orders 3 of width 4 lost 10-20% up to
    # 41K entries and gained from 60K; Hessians gained from 4K).
    x, w = flat.tensors[split.x], flat.tensors[split.w]
    seeds = w.numel() + sum(
        flat.tensors[pos].numel() for pos in flat.diff if pos not in (split.x, split.w)
    ) + (x.shape[1] if split.x_diff is not None else 0)
    entries = seeds ** (request.order - 1) * x.shape[0] * w.shape[1]
    return split if entries >= (SPLIT_MIN_ENTRIES_HESSIAN if request.order == 2
                                else SPLIT_MIN_ENTRIES) else None


def _build_split(
    request: Request, flat: FlatCall, forward: Traced, out_vals: list[torch.Tensor],
    split: Split,
) -> Lowered:
    """Generate ``g``'s derivatives of orders ``0..n`` w.r.t. ``h`` and ``f``'s other
    leaves, composed into ``f``'s blocks in the same code."""
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
    inner_keys = _structure(
        inner_spec, n_out, inner_argnums, inner_flat.layouts, inner_request.orders
    )[0]
    keys, specs = _structure(
        forward.out_spec, n_out, request.argnums, flat.layouts, request.orders
    )
    composition = Composition(
        split, tuple(keys),
        mapping=tuple(None if pos in (split.x, split.w) else inner_flat.diff.index(1 + pos)
                      for pos in flat.diff),
        inner_keys=tuple(inner_keys),
        h_leaf=inner_flat.diff.index(0),
        leaf_ranks=tuple(flat.tensors[pos].dim() for pos in flat.diff),
        out_ranks=tuple(v.dim() for v in out_vals),
    )
    inner = build(inner_request, inner_flat, composition)
    return replace(inner, result_spec=_result_spec(specs, request, None), first_layer=split)


def _check_outputs(out_vals: list[torch.Tensor], call: str) -> None:
    for val in out_vals:
        if not val.dtype.is_floating_point:
            raise OutputError(
                f"{call}: the function returns a tensor of dtype {val.dtype}.\n"
                f"  Expected: floating-point outputs (integer outputs have no derivative).\n"
                f"  Fix: return a floating tensor, or move it to the aux output "
                f"(has_aux=True)."
            )


def _plan_reverse(
    request: Request, flat: FlatCall, forward: Traced, out_vals: list[torch.Tensor],
    shapes: list[tuple[int, ...]],
) -> tuple[Traced, SeedPlan]:
    """The gradient graph and its seed space (batch compression for a scalar output)."""
    reverse = _trace_reverse(request, flat, forward)
    if out_vals[0].numel() != 1:
        return reverse, SeedPlan(tuple(plain_segments(shapes)), ())

    @functools.cache  # priced as a candidate, then prepared again once chosen
    def prepared(plan: SeedPlan) -> tuple[fx.GraphModule, SeedPlan]:
        if request.order != 2:  # see hod._per_example: a Hessian's blocks only
            return reverse.gm, plan
        return with_per_example_terms(reverse.gm, flat.diff, plan)

    def work(plan: SeedPlan) -> float:
        gm, plan = prepared(plan)
        spans = {pos: (s.offset, s.offset + s.size)
                 for pos, s in zip(flat.diff, plan.segments, strict=True)}
        identities = frozenset(
            pos for pos, s in zip(flat.diff, plan.segments, strict=True) if s.batch_dim is None
        )
        return derivative_work(
            gm, spans, _needs(Mode.REVERSE_LAST, 0, plan), request.order - 1, identities
        )

    seeds = plan_seeds(
        reverse.gm, flat.diff, shapes, _gradients_of, work
    )
    gm, seeds = prepared(seeds)
    return replace(reverse, gm=gm), seeds


def _needs(mode: Mode, n_diff: int, seeds: SeedPlan) -> list[tuple[int, int] | None]:
    """The seeds each differentiated output's derivatives must cover.

    Forward mode reads every seed of every output. Reverse-last reads a block
    ``(l1, ..., ln)`` from the gradient of its lead leaf (see :func:`_lead`), seeded by
    the others, whose segments come later: so the gradient of an uncompressed leaf needs
    only the seeds from its own segment on (the other blocks follow by symmetry).
    """
    full = (0, seeds.size)
    if mode is Mode.FORWARD:
        return [full] * n_diff
    compressed = [s for s in seeds.segments if s.batch_dim is not None]
    # With per-example terms, the blocks pairing a compressed leaf with an uncompressed
    # one come from those terms, seeded by the compressed leaves only.
    own = full
    if seeds.per_example:
        own = (min(s.offset for s in compressed), max(s.offset + s.size for s in compressed))
    needs: list[tuple[int, int] | None] = [None]
    for segment in seeds.segments:
        needs.append(own if segment.batch_dim is not None else (segment.offset, seeds.size))
    return needs + [own] * len(seeds.per_example)


def _lead(key: BlockKey, segments: Sequence[Segment]) -> int:
    """Which leaf of a reverse-last block to read the block from: a compressed one (its
    gradient is tracked), else the one whose segment comes first."""
    return min(
        range(len(key.leaves)),
        key=lambda i: (segments[key.leaves[i]].batch_dim is None,
                       segments[key.leaves[i]].offset),
    )


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


def _block(
    em: Emitter, mode: Mode, key: BlockKey, out_jets: list[Jet], out_vals: list[torch.Tensor],
    seeds: SeedPlan, leaf_dtypes: list[torch.dtype], compact: int | None = None,
) -> fx.Node:
    """The tensor of one result block (see :func:`~hod._assemble.extract_block`).

    Its dtype is that of the first input it differentiates by, as in torch.func (the
    reverse-mode Jacobian takes its input's dtype). With ``compact``, a compressed leaf
    that leads a reverse-last block keeps its other slots compressed: they take its
    within-row shape, and the block holds only the entries on one row of the leaf.
    """
    if not key.leaves:
        return out_jets[key.out].primal
    y = out_vals[key.out]
    segments = seeds.segments
    shape = list(y.shape) + [d for leaf in key.leaves for d in segments[leaf].shape]
    per_example = _per_example_source(mode, key, seeds)
    if per_example is not None:
        source, x = per_example
        jet = out_jets[source]
        return per_example_block(
            em, jet.d(1), jet.span or (0, seeds.size), segments[x],
            key.leaves[0] == x, shape, leaf_dtypes[key.leaves[0]],
        )
    if mode is Mode.FORWARD:
        source, seeded, order = key.out, list(key.leaves), list(range(len(key.leaves) + 1))
        value_groups = [list(y.shape)]
    else:
        # Output 1 + l is the gradient w.r.t. leaf l, of shape x_l.shape, or (m,) + x_l.shape
        # for an output of m > 1 elements; by symmetry any leaf of the block can lead,
        # seeded by the others.
        lead = _lead(key, segments)
        source = 1 + key.leaves[lead]
        seeded = [leaf for i, leaf in enumerate(key.leaves) if i != lead]
        value_groups = [list(segments[key.leaves[lead]].shape)]
        if y.numel() > 1:
            value_groups.insert(0, [y.numel()])
        first = len(value_groups)  # the first seed group
        order = [first - 1 if i == lead else first + i - (i > lead)
                 for i in range(len(key.leaves))]
        if y.numel() > 1:
            order.insert(0, 0)
    seeded_segments = [segments[s] for s in seeded]
    if mode is not Mode.FORWARD and compact is not None and compact in seeded:
        # Compact: the lead's rows stand for the compressed leaf's other slots too.
        seeded_segments = [Segment(g.offset, g.sub_shape) if s == compact else g
                           for s, g in zip(seeded, seeded_segments, strict=True)]
        shape = list(y.shape) + [
            d for i, leaf in enumerate(key.leaves)
            for d in (segments[leaf].sub_shape if leaf == compact and i != lead
                      else segments[leaf].shape)
        ]
    state = None
    if any(s.batch_dim is not None for s in seeded_segments):
        state = seeds.out_states[source]
        assert state != MIXED, "the planner only compresses seeds for tracked outputs"
    jet = out_jets[source]
    return extract_block(
        em, jet.d(len(seeded)), jet.span or (0, seeds.size), value_groups, state,
        seeded_segments, order, shape, leaf_dtypes[key.leaves[0]],
    )


def _per_example_source(mode: Mode, key: BlockKey, seeds: SeedPlan) -> tuple[int, int] | None:
    """For a reverse-last block of a compressed leaf and a weight with per-example terms:
    the output holding those terms and the compressed leaf."""
    if mode is Mode.FORWARD or len(key.leaves) != 2 or not seeds.per_example:
        return None
    segments = seeds.segments
    compressed = [leaf for leaf in key.leaves if segments[leaf].batch_dim is not None]
    weights = [leaf for leaf in key.leaves if leaf in seeds.per_example]
    if len(compressed) != 1 or len(weights) != 1:
        return None
    return 1 + len(segments) + seeds.per_example.index(weights[0]), compressed[0]


def _outputs(gm: fx.GraphModule) -> list[fx.Node]:
    return list(next(n for n in gm.graph.nodes if n.op == "output").args[0])


def _result_spec(specs: list[TreeSpec], request: Request, aux_spec: TreeSpec | None):
    from torch.utils._pytree import tree_unflatten

    trees = []
    for spec in specs:
        trees.append(tree_unflatten([_Leaf()] * spec.num_leaves, spec))
    tree = tuple(trees) if request.with_values else trees[0]
    if request.has_aux:
        tree = (tree, tree_unflatten([_Leaf()] * aux_spec.num_leaves, aux_spec))
    return tree_flatten(tree)[1]


class _Leaf:
    """A placeholder leaf used to build the result's tree spec."""


# -- tracing the two graphs -------------------------------------------------------------------
def _flat_function(request: Request, flat: FlatCall, holder: dict | None):
    """``f`` over the flat tensor leaves, returning ``outputs + aux`` leaves."""

    def flat_f(*tensors: torch.Tensor) -> list[torch.Tensor]:
        args, kwargs = flat.rebuild(list(tensors))
        result = request.f(*args, **kwargs)
        aux: list[torch.Tensor] = []
        if request.has_aux:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise OutputError(
                    f"{request.call}: has_aux=True, so the function must return a pair "
                    f"(output, aux), but it returned {type(result).__name__}"
                    + (f" of length {len(result)}" if isinstance(result, tuple) else "")
                    + ".\n  Fix: return (output, aux), or drop has_aux=True."
                )
            result, aux_tree = result
            aux, aux_spec = flatten_outputs(aux_tree, "aux output", request.call)
            if holder is not None:
                holder["aux_spec"] = aux_spec
        outs, out_spec = flatten_outputs(result, "output", request.call)
        if holder is not None:
            holder["out_spec"], holder["n_out"], holder["n_aux"] = out_spec, len(outs), len(aux)
        return [*outs, *aux]

    return flat_f


def _trace_forward(request: Request, flat: FlatCall) -> Traced:
    holder: dict = {}
    gm = trace(
        _flat_function(request, flat, holder), flat.tensors, request.call,
        request.allow_random,
    )
    return Traced(gm, holder["out_spec"], holder.get("aux_spec"), holder["n_out"],
                   holder["n_aux"])


def _trace_reverse(request: Request, flat: FlatCall, forward: Traced) -> Traced:
    """Trace ``[y, dy/dx_leaf for each differentiated leaf, *aux]`` for one output ``y``."""
    flat_f = _flat_function(request, flat, None)
    n_out = forward.n_out

    def reverse(*tensors: torch.Tensor) -> list[torch.Tensor]:
        def of_diff(*diff: torch.Tensor):
            filled = list(tensors)
            for pos, value in zip(flat.diff, diff, strict=True):
                filled[pos] = value
            outs = flat_f(*filled)
            return outs[0], outs[n_out:]

        diff = [tensors[pos] for pos in flat.diff]
        y, vjp_fn, aux = torch.func.vjp(of_diff, *diff, has_aux=True)
        if y.numel() == 1:
            grads = vjp_fn(torch.ones_like(y))
        else:
            basis = torch.eye(y.numel(), dtype=y.dtype, device=y.device)
            grads = torch.func.vmap(vjp_fn)(basis.view(y.numel(), *y.shape))
        return [y, *grads, *aux]

    gm = trace(reverse, flat.tensors, request.call, request.allow_random)
    return Traced(gm, forward.out_spec, forward.aux_spec, 1 + len(flat.diff), forward.n_aux)
