"""Analyze stage: the index-level sparsity patterns of a traced graph's Jacobian and Hessian.

Every node gets a *pattern*: a boolean matrix ``(node entries, S)`` whose entry ``(e, j)``
says that entry ``e`` of the node (flattened) may depend on entry ``j`` of the
differentiated inputs (each flattened, concatenated in ``diff`` order, ``S`` in all). A
pattern is held by its nonzeros, COO indices sorted row-major and unique
(:class:`Pattern`), so the work is proportional to the nonzeros, never to ``entries x S``.

Patterns flow through the graph by one rule per op family:

- data movement (views, slices, pads, ``cat``, ``flip``, ``index``, ``gather``, ...): the
  op runs on tensors whose values are ``1 +`` the flat index of their entries, so each
  output entry names the one input entry it copies (``0``: a fill value, no entry);
- scatters (``scatter``, ``scatter_add``, ``index_add``, ``index_put``): each source
  entry's target is found by the matching gather of the flat indices of ``self``; every
  write to an entry counts (as in torch's derivative when indices repeat);
- elementwise ops broadcast their inputs; ``mul`` by a constant drops the entries where the
  constant is zero, ``where`` with a constant condition keeps the side it picks;
- reductions, softmaxes, ``avg_pool2d`` and cumulative ops gather their groups, slices,
  windows and prefixes;
- ``mm``/``bmm``/``addmm``/``mv``/``dot`` and ``convolution`` (any dims, also
  transposed) pair the entries that meet in a product, skipping the zeros of a constant
  operand (``get_attr`` tensors and whatever the graph computes from them alone);
- ops without a rule are dense: every output entry depends on every entry its inputs
  depend on (never wrongly sparse, only too full).

Values are known only for constants: a non-differentiated argument of ``f`` may change
between calls of the same signature, so its values never shape a pattern (an index
tensor computed from one makes the op that uses it dense).

The Hessian pattern of a scalar output is the union, over the output's ancestors, of each
op's second-order interactions: none for linear and piecewise-linear ops (sums, views,
``relu``, ``abs``, ``amax``, ...); ``deps(a_e) x deps(b_e)`` for the factors meeting in
a product (per entry for ``mul``, per contracted index for ``mm``, per weight and input
entry for convolutions); ``deps(a) x deps(b) + deps(b) x deps(b)`` for ``a / b``; and
``deps(y_e) x deps(y_e)`` per entry ``e`` for any other op ``y`` (``exp``, ``pow``, ...).
This global interaction set is a superset of the exact pattern: an interaction counts even
where the path from the op to the output has a zero second factor.

The work is proportional to the dependency pairs the rules move (an op whose output
entries each gather ``r`` input entries of ``d`` dependencies moves ``r d`` pairs per
entry), so a sparse problem of ``S = 10,000`` takes tens of milliseconds; dense problems
cost what their dense patterns hold.

Exact (equal to the pattern of a dense Jacobian at generic points) for all ops above except
where values decide: ``amax``/``max``-like selections (and max pools, which trace to
them) and ``where`` with a variable condition depend on every candidate (a superset), and
``relu``-like ops on both sides of their kink.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import fx
from torch.nn import functional

aten = torch.ops.aten
Tensor = torch.Tensor

#: Above this many pairs, a node's self-interactions in a Hessian are taken as the square
#: of the union of its dependencies (a superset, and what a dense block is anyway).
MAX_SQUARE_PAIRS = 20_000_000


@dataclass(frozen=True)
class Pattern:
    """A boolean ``(n_rows, width)`` matrix by its nonzeros: ``rows`` and ``cols``, int64
    ``(nnz,)``, sorted row-major and unique."""

    rows: Tensor
    cols: Tensor
    n_rows: int
    width: int

    @cached_property
    def counts(self) -> Tensor:
        """The nonzeros of each row, ``(n_rows,)``."""
        return torch.bincount(self.rows, minlength=self.n_rows)

    @cached_property
    def starts(self) -> Tensor:
        """Where each row's nonzeros begin in ``cols``, ``(n_rows,)``."""
        return torch.cumsum(self.counts, 0) - self.counts


def empty(n_rows: int, width: int) -> Pattern:
    """The pattern of ``n_rows`` entries that depend on nothing."""
    none = torch.zeros(0, dtype=torch.long)
    return Pattern(none, none, n_rows, width)


def coalesced(rows: Tensor, cols: Tensor, n_rows: int, width: int) -> Pattern:
    """The pattern holding the pairs ``(rows, cols)``, repeats allowed."""
    keys = torch.unique(rows * width + cols, sorted=True)
    return Pattern(keys // width, keys % width, n_rows, width)


def _segment_arange(counts: Tensor) -> Tensor:
    """``0 .. c-1`` for every ``c`` in ``counts``, concatenated."""
    total = int(counts.sum())
    firsts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=total)
    return torch.arange(total) - firsts


def gather(p: Pattern, src: Tensor) -> Pattern:
    """The pattern whose row ``o`` is row ``src[o]`` of ``p`` (none where ``src[o] < 0``)."""
    src = src.reshape(-1)
    valid = src >= 0
    safe = src.clamp(min=0)
    counts = torch.where(valid, p.counts[safe], 0) if p.n_rows else torch.zeros_like(src)
    total = int(counts.sum())
    rows = torch.repeat_interleave(torch.arange(src.numel()), counts, output_size=total)
    if total == 0:
        return empty(src.numel(), p.width)
    first = torch.repeat_interleave(p.starts[safe], counts, output_size=total)
    return Pattern(rows, p.cols[first + _segment_arange(counts)], src.numel(), p.width)


def compose(p: Pattern, out: Tensor, src: Tensor, n_rows: int) -> Pattern:
    """The pattern whose row ``o`` is the union of the rows ``src[e]`` of ``p`` over the
    pairs ``e`` with ``out[e] == o``."""
    picked = gather(p, src)
    return coalesced(out.reshape(-1)[picked.rows], picked.cols, n_rows, p.width)


def union(patterns: Sequence[Pattern], n_rows: int, width: int) -> Pattern:
    """The entrywise union of patterns of ``n_rows`` rows."""
    full = [p for p in patterns if p.rows.numel()]
    if len(full) <= 1:
        return full[0] if full else empty(n_rows, width)
    rows = torch.cat([p.rows for p in full])
    return coalesced(rows, torch.cat([p.cols for p in full]), n_rows, width)


def stacked(patterns: Sequence[Pattern], width: int) -> Pattern:
    """The patterns one under the other (rows of the second after those of the first)."""
    offsets = [0]
    for p in patterns:
        offsets.append(offsets[-1] + p.n_rows)
    rows = torch.cat([torch.zeros(0, dtype=torch.long)]
                     + [p.rows + o for p, o in zip(patterns, offsets, strict=False)])
    cols = torch.cat([torch.zeros(0, dtype=torch.long)] + [p.cols for p in patterns])
    return Pattern(rows, cols, offsets[-1], width)


def dense(patterns: Sequence[Pattern], n_rows: int, width: int) -> Pattern:
    """Every one of ``n_rows`` entries depending on everything the ``patterns`` hold."""
    cols = torch.unique(torch.cat([torch.zeros(0, dtype=torch.long)]
                                  + [p.cols for p in patterns]))
    rows = torch.arange(n_rows).repeat_interleave(cols.numel())
    return Pattern(rows, cols.repeat(n_rows), n_rows, width)


def cross(a: Pattern, b: Pattern) -> tuple[Tensor, Tensor]:
    """The pairs ``(i, j)`` with ``i`` in row ``e`` of ``a`` and ``j`` in row ``e`` of
    ``b``, for every row ``e`` (the two have the same rows), as two ``(pairs,)`` tensors."""
    if a.rows.numel() == 0 or b.rows.numel() == 0:
        return empty(0, a.width).rows, empty(0, a.width).cols
    times = b.counts[a.rows]
    if int((a.counts * b.counts).sum()) > MAX_SQUARE_PAIRS:
        left, right = torch.unique(a.cols), torch.unique(b.cols)
        return left.repeat_interleave(right.numel()), right.repeat(left.numel())
    total = int(times.sum())
    first = torch.repeat_interleave(a.cols, times, output_size=total)
    where = torch.repeat_interleave(b.starts[a.rows], times, output_size=total)
    return first, b.cols[where + _segment_arange(times)]


class TooDense(Exception):
    """A pattern passed the ``budget`` it was looked for with."""


def jacobian_pattern(gm: fx.GraphModule, diff: Sequence[int], n_out: int,
                     budget: int | None = None) -> Tensor:
    """The nonzeros of the Jacobian of ``gm``'s first ``n_out`` outputs with respect to its
    placeholders at positions ``diff``, as int64 COO indices ``(2, nnz)``, coalesced.

    Row ``i`` is entry ``i`` of the outputs (each flattened, concatenated in order); column
    ``j`` is entry ``j`` of the differentiated inputs (each flattened, in ``diff`` order).
    With a ``budget``, :class:`TooDense` is raised as soon as a node's pattern holds more
    nonzeros than that.
    """
    state = _propagate(gm, diff, budget=budget)
    outputs = _outputs(gm)[:n_out]
    stacked_outputs = stacked([state.patterns[node] for node in outputs], state.width)
    return torch.stack([stacked_outputs.rows, stacked_outputs.cols])


def hessian_pattern(gm: fx.GraphModule, diff: Sequence[int], n_out: int = 1,
                    budget: int | None = None) -> Tensor:
    """The nonzeros of the Hessian of ``gm``'s first output, which holds one entry, with
    respect to its placeholders at positions ``diff`` (flattened, in ``diff`` order), as
    int64 COO indices ``(2, nnz)``, coalesced and symmetric: the interactions of every
    nonlinear op among the output's ancestors (see the module's docstring). With a
    ``budget``, :class:`TooDense` is raised as soon as a node's pattern, or the
    interactions recorded, hold more than that."""
    root = _outputs(gm)[0]
    value = root.meta.get("val")
    if n_out != 1 or not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError("hessian_pattern: the differentiated output must be one entry")
    state = _propagate(gm, diff, _ancestors(root), budget)
    rows = torch.cat([torch.zeros(0, dtype=torch.long)] + [r for r, _ in state.pairs])
    cols = torch.cat([torch.zeros(0, dtype=torch.long)] + [c for _, c in state.pairs])
    upper = coalesced(torch.minimum(rows, cols), torch.maximum(rows, cols), state.width,
                      state.width)  # one half first: the pairs come in both orders
    both = coalesced(torch.cat([upper.rows, upper.cols]), torch.cat([upper.cols, upper.rows]),
                     state.width, state.width)
    return torch.stack([both.rows, both.cols])


def constants_fingerprint(gm: fx.GraphModule) -> tuple[tuple[int, int], ...]:
    """``(version, data_ptr)`` of every tensor ``gm`` holds as a constant (``get_attr``).

    The graph holds the caller's own tensors (a closed-over matrix, a module's weights), so
    an in-place change (an optimiser step) can turn a zero the pattern relied on into a
    nonzero: a pattern stays valid while this fingerprint is unchanged.
    """
    found = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attribute(gm, node.target)
            if isinstance(value, Tensor):
                found.append((value._version, value.data_ptr()))
    return tuple(found)


def _attribute(gm: fx.GraphModule, target: str) -> object:
    value = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value


def _outputs(gm: fx.GraphModule) -> list[fx.Node]:
    return list(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])


def _ancestors(root: fx.Node) -> set[fx.Node]:
    seen, todo = {root}, [root]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


class _State:
    """What the propagation knows: each node's pattern (a tuple of them for an op with
    several outputs, ``None`` for a non-tensor), the values of constant nodes and, when
    recording a Hessian (``curved`` holds the output's ancestors), the interaction pairs."""

    def __init__(self, width: int, curved: set[fx.Node] | None) -> None:
        self.width = width
        self.patterns: dict[fx.Node, object] = {}
        self.values: dict[fx.Node, object] = {}
        self.curved = curved
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.interactions = 0  # pairs recorded, repeats counted
        self.node: fx.Node | None = None  # the node being analysed

    def pattern(self, arg: object) -> Pattern:
        """``arg``'s pattern, empty for a constant that is not a node."""
        if isinstance(arg, fx.Node):
            return self.patterns[arg]
        return empty(1, self.width)

    def value(self, arg: object) -> Tensor | None:
        """``arg``'s value when it is known (constants only), else None."""
        if isinstance(arg, fx.Node):
            value = self.values.get(arg)
            return value if isinstance(value, Tensor) else None
        return torch.as_tensor(arg) if isinstance(arg, (int, float, bool)) else None

    def interact(self, a: Pattern, b: Pattern) -> None:
        """Record that ``deps(a_e) x deps(b_e)`` meet in a second derivative, every ``e``."""
        if self.curved is not None and self.node in self.curved:
            self.pairs.append(cross(a, b))
            self.interactions += self.pairs[-1][0].numel()


def _propagate(gm: fx.GraphModule, diff: Sequence[int], curved: set | None = None,
               budget: int | None = None) -> _State:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sizes = [placeholders[pos].meta["val"].numel() for pos in diff]
    state = _State(sum(sizes), curved)
    offsets = dict(zip(diff, torch.cumsum(torch.tensor([0, *sizes]), 0).tolist(), strict=False))
    for position, node in enumerate(placeholders):
        n = node.meta["val"].numel() if isinstance(node.meta.get("val"), Tensor) else 0
        if position in offsets:
            state.patterns[node] = Pattern(torch.arange(n), torch.arange(n) + offsets[position],
                                           n, state.width)
        else:
            state.patterns[node] = _blank(node.meta.get("val"), state.width)
    for node in gm.graph.nodes:
        state.node = node
        if node.op == "get_attr":
            value = _attribute(gm, node.target)
            state.values[node] = value
            state.patterns[node] = _blank(value, state.width)
        elif node.op == "call_function":
            state.patterns[node] = _visit(node, state)
            if budget is not None and _held(state, node) > budget:
                raise TooDense(node.name)
    return state


def _held(state: _State, node: fx.Node) -> int:
    """The nonzeros of ``node``'s pattern, or of the interactions so far if more."""
    pattern = sum(p.rows.numel() for p in _flat_patterns([state.patterns[node]]))
    return max(pattern, state.interactions)


def _blank(value: object, width: int) -> object:
    """The pattern of ``value`` when it depends on nothing."""
    if isinstance(value, Tensor):
        return empty(value.numel(), width)
    if isinstance(value, (tuple, list)):
        return tuple(_blank(v, width) for v in value)
    return None


def _visit(node: fx.Node, state: _State) -> object:
    val = node.meta.get("val")
    if node.target is operator.getitem:
        source, index = node.args
        if isinstance(state.values.get(source), (tuple, list)):
            state.values[node] = state.values[source][index]
        return state.patterns[source][index]
    inputs = node.all_input_nodes
    if all(n in state.values for n in inputs) and not _is_random(node.target) \
            and node.target not in _UNINITIALISED:
        try:
            state.values[node] = node.target(*fx.map_arg(node.args, state.values.get),
                                             **fx.map_arg(node.kwargs, state.values.get))
        except Exception:  # noqa: BLE001 -- a constant it cannot compute stays unknown
            pass
        return _blank(val, state.width)
    patterns = [state.patterns[n] for n in inputs]
    if _zero_derivative(node) or all(_is_blank(p) for p in patterns) or not _floating(val):
        return _blank(val, state.width)
    rule = _rule(node.target)
    try:
        result = rule(node, state) if rule is not None else None
    except (RuntimeError, TypeError, ValueError, IndexError):  # a form the rule does not know
        rule = result = None
    if result is None:
        result = _fill(val, lambda v: dense(_flat_patterns(patterns), v.numel(), state.width))
    if rule not in _OWN_CURVATURE and node.target not in _LINEAR:
        for p in _flat_patterns([result]):
            state.interact(p, p)
    return _floating_only(val, result, state.width)


def _is_random(op: object) -> bool:
    return isinstance(op, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in op.tags


def _zero_derivative(node: fx.Node) -> bool:
    """Whether ``node``'s derivative is zero almost everywhere (rounding, fresh tensors)."""
    if node.target in (aten.div.Tensor_mode, aten.div.Scalar_mode):
        return _argument(node, "rounding_mode", None) is not None
    if node.target is aten.pow.Tensor_Scalar:
        return node.args[1] == 0
    return node.target in _ZERO_DERIVATIVE


def _floating(val: object) -> bool:
    """Whether ``val`` (a tensor, or a tuple of values) holds a floating-point tensor."""
    if isinstance(val, Tensor):
        return val.is_floating_point()
    return isinstance(val, (tuple, list)) and any(_floating(v) for v in val)


def _is_blank(p: object) -> bool:
    return all(q.rows.numel() == 0 for q in _flat_patterns([p]))


def _flat_patterns(items: Sequence[object]) -> list[Pattern]:
    out: list[Pattern] = []
    for item in items:
        if isinstance(item, Pattern):
            out.append(item)
        elif isinstance(item, (tuple, list)):
            out.extend(_flat_patterns(item))
    return out


def _fill(val: object, make: Callable[[Tensor], Pattern]) -> object:
    """``make(v)`` for every tensor ``v`` in ``val`` (a tensor or a tuple of them)."""
    if isinstance(val, Tensor):
        return make(val)
    if isinstance(val, (tuple, list)):
        return tuple(_fill(v, make) for v in val)
    return None


def _floating_only(val: object, result: object, width: int) -> object:
    """``result`` with the patterns of non-floating outputs (indices, masks) emptied."""
    if isinstance(val, Tensor):
        return result if val.is_floating_point() else empty(val.numel(), width)
    if isinstance(val, (tuple, list)):
        return tuple(_floating_only(v, r, width) for v, r in zip(val, result, strict=True))
    return None


def _rule(op: object) -> Callable[[fx.Node, _State], object] | None:
    rule = _RULES.get(op)
    if rule is None and isinstance(op, torch._ops.OpOverload):
        if torch.Tag.pointwise in op.tags:
            return _elementwise
        if torch.Tag.reduction in op.tags:
            return _reduction
    return rule


def _index_tensor(offset: int, like: Tensor) -> Tensor:
    """``1 + offset + `` the flat index of each entry, shaped like ``like`` (float64, exact
    up to 2**53 entries)."""
    n = like.numel()
    return torch.arange(offset + 1, offset + n + 1, dtype=torch.float64).view(like.shape)


class _Unknown(Exception):
    """An index or mask the op needs is not a constant."""


def _movement(node: fx.Node, state: _State) -> object:
    """Ops copying entries (or writing fill values): run on index tensors, each output entry
    names the entry of the (concatenated) floating inputs it copies."""
    data: list[fx.Node] = []
    offsets = [0]

    def substitute(arg: object) -> object:
        if isinstance(arg, fx.Node):
            val = arg.meta["val"]
            if not val.is_floating_point():
                if state.value(arg) is None:
                    raise _Unknown
                return state.value(arg)
            data.append(arg)
            offsets.append(offsets[-1] + val.numel())
            return _index_tensor(offsets[-2], val)
        return 0.0 if isinstance(arg, float) else arg  # fill values: no source

    try:
        args = fx.node.map_aggregate(node.args, substitute)
        kwargs = fx.node.map_aggregate(node.kwargs, substitute)
    except _Unknown:  # a variable mask or index: elementwise ops still are elementwise
        return _elementwise(node, state) if torch.Tag.pointwise in node.target.tags else None
    sources = stacked([state.patterns[n] for n in data], state.width)
    return _fill(node.target(*args, **kwargs),
                 lambda out: gather(sources, out.reshape(-1).long() - 1))


def _index_put(node: fx.Node, state: _State) -> object:
    """``index_put``: ``values`` written (or with ``accumulate``, added) into ``self``."""
    this, indices, values = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if any(i is not None and state.value(i) is None for i in indices):
        return None
    target = _index_tensor(-1, this.meta["val"]).long()[
        tuple(None if i is None else state.value(i) for i in indices)]
    source = torch.arange(values.meta["val"].numel()).view(values.meta["val"].shape)
    return _added(state, this, values, target, source.expand(target.shape), not accumulate)


def _scatter(node: fx.Node, state: _State) -> object:
    """``scatter`` (``src`` written), ``scatter_add`` and ``scatter_reduce`` (added: a
    superset for the selecting reductions). Every write to an entry counts, as in torch's
    derivative when indices repeat."""
    this, dim, index, src = node.args[:4]
    index_value = state.value(index)
    if index_value is None:
        return None
    target = torch.gather(_index_tensor(-1, this.meta["val"]).long(), dim, index_value)
    if not isinstance(src, fx.Node):  # scatter.value: a constant written
        src = None
        picked = torch.zeros(0, dtype=torch.long)
    else:
        whole = torch.arange(src.meta["val"].numel()).view(src.meta["val"].shape)
        picked = whole[tuple(slice(0, s) for s in index_value.shape)]
    overwrite = node.target in (aten.scatter.src, aten.scatter.value)
    return _added(state, this, src, target, picked, overwrite)


def _index_add(node: fx.Node, state: _State) -> object:
    this, dim, index, source = node.args[:4]
    index_value = state.value(index)
    if index_value is None:
        return None
    target = torch.index_select(_index_tensor(-1, this.meta["val"]).long(), dim, index_value)
    return _added(state, this, source, target, torch.arange(target.numel()), False)


def _added(state: _State, this: fx.Node, source: fx.Node | None, target: Tensor, src: Tensor,
           overwrite: bool) -> Pattern:
    """``this`` with the entries ``src`` of ``source`` added into (or, ``overwrite``,
    written over) its entries ``target``."""
    n = this.meta["val"].numel()
    kept = torch.arange(n)
    if overwrite:
        kept[target.reshape(-1)] = -1
    pieces = [gather(state.pattern(this), kept)]
    if source is not None:
        pieces.append(compose(state.pattern(source), target.reshape(-1), src.reshape(-1), n))
    return union(pieces, n, state.width)


def _broadcast_source(arg: fx.Node, shape: torch.Size) -> Tensor:
    """The flat index in ``arg`` of each entry of ``arg`` broadcast to ``shape``."""
    val = arg.meta["val"]
    return torch.arange(val.numel()).view(val.shape).expand(shape).clone()


def _elementwise(node: fx.Node, state: _State) -> Pattern:
    """Broadcasting elementwise ops. A constant zero factor of ``mul`` and the side a
    constant condition of ``where`` leaves out drop their entries."""
    shape = node.meta["val"].shape
    pieces = {}
    for arg in node.args:
        if not isinstance(arg, fx.Node) or not arg.meta["val"].is_floating_point():
            continue
        src = _broadcast_source(arg, shape)
        if node.target is aten.mul.Tensor:
            other = state.value(node.args[1] if arg is node.args[0] else node.args[0])
            if other is not None:
                src[(other == 0).expand(shape)] = -1
        if node.target is aten.where.self and state.value(node.args[0]) is not None:
            picked = state.value(node.args[0]).expand(shape)
            src[~picked if arg is node.args[1] else picked] = -1
        pieces[arg] = gather(state.pattern(arg), src)
    result = union(list(pieces.values()), node.meta["val"].numel(), state.width)
    if node.target in (aten.mul.Tensor, aten.div.Tensor):
        blank = empty(result.n_rows, state.width)
        a, b = (pieces.get(arg, blank) for arg in node.args[:2])
        state.interact(a, b)  # a product, or a quotient's numerator with its denominator
        if node.target is aten.div.Tensor:
            state.interact(b, b)
    elif node.target not in _LINEAR and not (node.target is aten.pow.Tensor_Scalar
                                             and node.args[1] == 1):
        state.interact(result, result)
    return result


def _argument(node: fx.Node, name: str, default: object) -> object:
    names = [a.name for a in node.target._schema.arguments]
    if name in node.kwargs:
        return node.kwargs[name]
    if name in names and names.index(name) < len(node.args):
        return node.args[names.index(name)]
    return default


def _groups(shape: torch.Size, dims: object) -> Tensor:
    """The flat index, among the results of a reduction over ``dims`` (all for None or
    ``[]``), of the group of each entry of a tensor of ``shape``."""
    rank = len(shape)
    if isinstance(dims, int):
        dims = [dims]
    reduced = set(range(rank)) if not dims else {d % max(rank, 1) for d in dims}
    kept = [1 if d in reduced else size for d, size in enumerate(shape)]
    return torch.arange(max(1, math.prod(kept))).view(kept).expand(shape).reshape(-1)



def _reduction(node: fx.Node, state: _State) -> object:
    """Reductions over ``dim``: each result depends on its group."""
    source = node.args[0]
    if any(not _is_blank(state.patterns[a]) for a in node.all_input_nodes if a is not source):
        return None
    p = state.pattern(source)
    groups = _groups(source.meta["val"].shape, _argument(node, "dim", None))
    return _fill(node.meta["val"], lambda v: coalesced(groups[p.rows], p.cols, v.numel(),
                                                       state.width))


def _slice_wide(node: fx.Node, state: _State) -> Pattern:
    """Softmaxes: each entry depends on its whole slice along ``dim``."""
    source = node.args[0]
    p = state.pattern(source)
    groups = _groups(source.meta["val"].shape, node.args[1])
    whole = coalesced(groups[p.rows], p.cols, int(groups.max()) + 1, state.width)
    return gather(whole, groups)


def _prefix(node: fx.Node, state: _State) -> object:
    """Cumulative ops: each entry depends on the entries before it along ``dim``."""
    source = node.args[0]
    shape = source.meta["val"].shape
    n = source.meta["val"].numel()
    order = torch.arange(n).view(shape)
    if len(shape):
        order = order.movedim(node.args[1] % len(shape), -1)
    lanes = order.reshape(-1, shape[node.args[1] % len(shape)] if len(shape) else 1)
    later, earlier = torch.tril_indices(lanes.shape[1], lanes.shape[1])
    result = compose(state.pattern(source), lanes[:, later], lanes[:, earlier], n)
    return _fill(node.meta["val"], lambda v: result)


def _transposed(batch: int, rows: int, cols: int) -> Tensor:
    """For each entry of ``(batch, cols, rows)``, its flat index in ``(batch, rows, cols)``."""
    return torch.arange(batch * rows * cols).view(batch, rows, cols).transpose(1, 2).reshape(-1)


def _left_factor(p: Pattern, right: Tensor | None, b: int, i: int, k: int, j: int) -> Pattern:
    """The dependencies that ``A @ B`` ((b, i, j)) gets through ``A`` ((b, i, k), pattern
    ``p``): ``A[b, i, k]`` reaches ``[b, i, j]`` unless the known ``B[b, k, j]`` is zero."""
    if p.rows.numel() == 0:
        return empty(b * i * j, p.width)
    if right is None:
        per_row = coalesced(p.rows // k, p.cols, b * i, p.width)
        return gather(per_row, torch.arange(b * i).view(b, i, 1).expand(b, i, j))
    bs, ks, js = (right.reshape(b, k, j) != 0).nonzero().unbind(1)
    rows = bs * i + torch.arange(i).view(-1, 1)
    return compose(p, rows * j + js, rows * k + ks, b * i * j)


def _product(state: _State, a: fx.Node, b: fx.Node, dims: tuple[int, int, int, int]) -> Pattern:
    """The pattern of ``A @ B`` for ``A`` of ``(batch, i, k)`` and ``B`` of ``(batch, k, j)``
    entries (``dims``); records their interaction."""
    batch, i, k, j = dims
    left, right = state.value(a), state.value(b)
    from_a = _left_factor(state.pattern(a), right, batch, i, k, j)
    b_transposed = gather(state.pattern(b), _transposed(batch, k, j))
    a_transposed = None if left is None else left.reshape(batch, i, k).transpose(1, 2)
    from_b = gather(_left_factor(b_transposed, a_transposed, batch, j, k, i),
                    _transposed(batch, j, i))
    if state.curved is not None:  # A[b, i, k] meets B[b, k, j] for every i and j
        by_k_a, by_k_b = state.pattern(a), state.pattern(b)
        state.interact(coalesced(by_k_a.rows // (i * k) * k + by_k_a.rows % k, by_k_a.cols,
                                 batch * k, state.width),
                       coalesced(by_k_b.rows // j, by_k_b.cols, batch * k, state.width))
    return union([from_a, from_b], batch * i * j, state.width)


def _matmul(node: fx.Node, state: _State) -> Pattern:
    """``mm``, ``bmm``, ``mv``, ``dot`` and ``addmm``/``baddbmm`` (plus a broadcast bias)."""
    op = node.target
    bias = None
    if op in (aten.addmm.default, aten.baddbmm.default):
        bias, *_ = node.args
        beta = _argument(node, "beta", 1)
        a, b = node.args[1:3]
        bias = None if beta == 0 else bias
    else:
        a, b = node.args[:2]
    shape_a, shape_b = a.meta["val"].shape, b.meta["val"].shape
    batch = shape_a[0] if len(shape_a) == 3 else 1
    i = shape_a[-2] if len(shape_a) >= 2 else 1
    k = shape_a[-1]
    j = shape_b[-1] if len(shape_b) >= 2 else 1
    product = _product(state, a, b, (batch, i, k, j))
    if not isinstance(bias, fx.Node):
        return product
    shape = node.meta["val"].shape
    spread = gather(state.pattern(bias), _broadcast_source(bias, shape))
    return union([product, spread], product.n_rows, state.width)


def _convolution(node: fx.Node, state: _State) -> Pattern:
    """Convolutions, transposed or not: an output entry depends on the input entries its
    window covers (skipping padding and the zeros of a constant weight), on the weights
    meeting an input entry there (not a constant zero) and on its bias."""
    x, w, bias = node.args[:3]
    out = node.meta["val"]
    target, source, weight_index = _convolution_terms(node)
    valid = (target >= 0) & (source >= 0)
    reach, meets = valid, valid
    if state.value(w) is not None:
        reach = reach & (state.value(w).reshape(-1)[weight_index] != 0)
    if state.value(x) is not None:
        meets = meets & (state.value(x).reshape(-1)[source.clamp(min=0)] != 0)
    pieces = [compose(state.pattern(x), target[reach], source[reach], out.numel()),
              compose(state.pattern(w), target[meets], weight_index[meets], out.numel())]
    _meet(state, state.pattern(x), state.pattern(w), source[valid], weight_index[valid])
    if isinstance(bias, fx.Node):
        channels = torch.arange(out.shape[1]).view(1, -1, 1)
        pieces.append(gather(state.pattern(bias), channels.expand(out.shape[0], out.shape[1],
                                                                  out[0, 0].numel())))
    return union(pieces, out.numel(), state.width)


def _convolution_terms(node: fx.Node) -> tuple[Tensor, Tensor, Tensor]:
    """Every term ``y[target] += x[source] * w[weight_index]`` of a convolution, as three
    flat-index tensors of one shape (-1 where the term falls in the padding).

    A plain convolution slides windows over ``x``; a transposed one is the adjoint, whose
    terms are those of the plain convolution of ``y``-shaped input to ``x``-shaped output.
    """
    x, w, _, stride, padding, dilation, transposed, _, groups = node.args
    n, spots = x.meta["val"].shape[0], x.meta["val"][0, 0].numel()
    kernel = w.meta["val"].shape[2:]
    slid = node.meta["val"] if transposed else x.meta["val"]
    windows = _sliding(_index_tensor(0, slid), kernel, stride, padding, dilation)
    if not transposed:  # w: (out, in per group, kernel); windows: over x
        per_out = w.meta["val"].shape[0] // groups
        windows = windows.view(n, groups, 1, -1, windows.shape[-1])
        full = (n, groups, per_out, windows.shape[3], windows.shape[-1])
        target = torch.arange(node.meta["val"].numel()).view(n, groups, per_out, 1, -1)
        weights = torch.arange(w.meta["val"].numel()).view(1, groups, per_out, -1, 1)
        return target.expand(full), windows.expand(full), weights.expand(full)
    per_in = w.meta["val"].shape[0] // groups  # w: (in, out per group, kernel); windows: over y
    windows = windows.view(n, groups, 1, -1, spots)
    full = (n, groups, per_in, windows.shape[3], spots)
    source = torch.arange(x.meta["val"].numel()).view(n, groups, per_in, 1, spots)
    weights = torch.arange(w.meta["val"].numel()).view(1, groups, per_in, -1, 1)
    return windows.expand(full), source.expand(full), weights.expand(full)


def _sliding(index: Tensor, kernel: Sequence[int], stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The windows of ``index``, ``(n, c, *spatial)`` holding ``1 +`` flat indices, as
    ``(n, c x kernel entries, spots)`` (channel-major, as ``unfold``) of flat indices, -1
    in the padding. A one-entry ``stride``/``padding``/``dilation`` serves every dim."""
    spatial = index.dim() - 2

    def each(values: int | Sequence[int]) -> list[int]:
        values = [values] if isinstance(values, int) else list(values)
        return values * spatial if len(values) == 1 else values

    kernel, stride, padding, dilation = map(each, (kernel, stride, padding, dilation))
    windows = functional.pad(index, [p for p in reversed(padding) for _ in range(2)])
    for d in range(spatial):
        span = dilation[d] * (kernel[d] - 1) + 1
        windows = windows.unfold(2 + d, span, stride[d])[..., :: dilation[d]]
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    windows = windows.permute(order)
    per_window = windows[0, 0].numel() // math.prod(kernel)
    return windows.reshape(index.shape[0], -1, per_window).long() - 1


def _meet(state: _State, a: Pattern, b: Pattern, index_a: Tensor, index_b: Tensor) -> None:
    """Record the interactions of the entries ``index_a`` of ``a`` with the entries
    ``index_b`` of ``b``, pair by pair (the factors of a bilinear op's terms)."""
    if state.curved is None or not a.rows.numel() or not b.rows.numel():
        return
    keys = torch.unique(index_a * b.n_rows + index_b)
    state.interact(gather(a, keys // b.n_rows), gather(b, keys % b.n_rows))


def _copy(node: fx.Node, state: _State) -> Pattern:
    """``copy(self, src)``: ``src`` broadcast to ``self``'s shape."""
    src = node.args[1]
    return gather(state.pattern(src), _broadcast_source(src, node.meta["val"].shape))


def _avg_pool(node: fx.Node, state: _State) -> Pattern | None:
    """``avg_pool2d`` (1-D pools trace to it): each output entry depends on its window."""
    source, kernel = node.args[:2]
    stride = _argument(node, "stride", []) or kernel
    shape = source.meta["val"].shape
    planes = _index_tensor(0, source.meta["val"]).view(-1, 1, *shape[-2:])
    windows = _sliding(planes, kernel, stride, _argument(node, "padding", [0]), [1])
    out = node.meta["val"]
    if windows.shape[0] * windows.shape[-1] != out.numel():  # ceil_mode's extra windows
        return None
    rows = torch.arange(out.numel()).view(windows.shape[0], 1, -1).expand(windows.shape)
    inside = windows >= 0
    return compose(state.pattern(source), rows[inside], windows[inside], out.numel())


def _ops(*names: str) -> list[object]:
    """The ATen overloads named ``"op.overload"`` that this torch has."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


_MOVEMENT = _ops(
    "view", "_unsafe_view", "reshape", "permute", "transpose.int", "t", "expand", "slice.Tensor",
    "select.int", "squeeze.dim", "squeeze.dims", "squeeze", "unsqueeze", "cat", "stack", "flip",
    "roll", "constant_pad_nd", "index_select", "gather", "index.Tensor", "_unsafe_index.Tensor",
    "repeat", "clone", "alias", "diagonal",
    "unfold", "split.Tensor", "split_with_sizes", "unbind.int", "narrow", "movedim.int",
    "diag_embed", "tril", "triu", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
    "replication_pad2d", "masked_fill.Scalar", "select_scatter", "slice_scatter",
    "diagonal_scatter", "lift_fresh_copy", "view_copy", "permute_copy", "expand_copy",
    "slice_copy.Tensor", "select_copy.int", "transpose_copy.int", "unsqueeze_copy",
    "squeeze_copy.dims", "t_copy", "split_copy.Tensor", "unbind_copy.int", "diagonal_copy",
)

_REDUCTIONS = _ops(
    "sum.dim_IntList", "sum", "mean.dim", "mean", "amax", "amin", "max", "min", "max.dim",
    "min.dim", "prod", "prod.dim_int", "var.correction", "std.correction", "var_mean.correction",
    "std_mean.correction", "logsumexp", "linalg_vector_norm", "norm.ScalarOpt_dim",
    "norm.Scalar", "nansum", "nanmean",
)

_RULES: dict[object, Callable[[fx.Node, _State], object]] = {
    **dict.fromkeys(_MOVEMENT, _movement),
    **dict.fromkeys(_REDUCTIONS, _reduction),
    **dict.fromkeys(_ops("_softmax", "_log_softmax"), _slice_wide),
    **dict.fromkeys(_ops("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"), _prefix),
    **dict.fromkeys(_ops("mm", "bmm", "mv", "dot", "addmm", "baddbmm"), _matmul),
    aten.convolution.default: _convolution,
    aten._to_copy.default: _elementwise,
    **dict.fromkeys(_ops("copy", "copy_"), _copy),
    aten.avg_pool2d.default: _avg_pool,
    aten.index_put.default: _index_put,
    **dict.fromkeys(_ops("scatter.src", "scatter.value", "scatter_add", "scatter_reduce.two"),
                    _scatter),
    aten.index_add.default: _index_add,
}

#: Rules that record a node's Hessian interactions themselves (none for linear ones).
_OWN_CURVATURE = {_movement, _copy, _elementwise, _matmul, _convolution, _index_put, _scatter,
                  _index_add}

#: Ops with no second derivative (linear, or piecewise linear: zero almost everywhere).
_LINEAR = set(_ops(
    "add.Tensor", "sub.Tensor", "neg", "rsub.Tensor", "rsub.Scalar", "add.Scalar",
    "sub.Scalar", "mul.Scalar", "div.Scalar", "where.self", "clone", "_to_copy", "alias",
    "relu", "abs", "clamp", "clamp.Tensor", "clamp_min", "clamp_max", "maximum", "minimum",
    "fmax", "fmin", "hardtanh", "sum.dim_IntList", "sum", "mean.dim", "mean", "nansum", "amax",
    "amin", "max", "min", "max.dim", "min.dim", "cumsum", "cummax", "cummin", "copy",
    "lerp.Scalar", "masked_fill.Scalar", "avg_pool2d",
))

#: Ops whose values are whatever memory held: never constants.
_UNINITIALISED = set(_ops("empty.memory_format", "empty_like", "empty_strided", "new_empty",
                          "new_empty_strided"))

#: Ops whose derivative is zero (almost everywhere).
_ZERO_DERIVATIVE = set(_ops(
    "sign", "floor", "ceil", "round", "trunc", "zeros_like", "ones_like", "full_like",
    "empty_like", "detach", "floor_divide", "new_zeros", "new_ones", "new_full", "new_empty",
))
