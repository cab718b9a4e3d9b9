"""The adjoint driver: a scalar's Hessian summed from its curved nodes' local terms.

For a scalar ``y`` (one per example, for a call holding examples), the Hessian w.r.t. the
seeded inputs is a sum over the nodes ``v = phi(u_1, .., u_m)`` that are not linear in
their tracked inputs:

    H[s, t] = sum_v sum_ab sum_i  vbar[i] * d2 phi / du_a du_b [i] * D u_a[s, i] * D u_b[t, i]

with ``vbar = dy/dv`` (the adjoint of ``v``) and ``D u`` the first-order derivatives of the
inputs. Reverse-last mode pushes ``D^1`` through ``f``'s whole gradient graph instead: every
product of the forward pass is paid twice per seed (the tangent forward, and the tangent of
its backward product). Here it is paid once, plus one ``(S, M) @ (M, S)`` per curved node of
``M`` entries, which is far cheaper when the seeds are few against the layer widths (the
Hessian of a network w.r.t. its input).

It applies when every node with a tracked input is elementwise (its second derivatives
come from its own rule, run over one seed per distinct tracked input), a softmax or
log-softmax (:data:`COUPLED`: a weighted contraction of the input's derivatives centered
along its dim), a product of two tracked factors (:data:`BILINEAR`: attention's ``Q K^T``
and ``P V``, ``T[s, t] = <D A_s, vbar @ D B_t^T>``), or linear in its tracked inputs
(:data:`LINEAR`: views, reductions, products and convolutions with one tracked operand);
otherwise :func:`adjoint_hessian` returns None and reverse-last mode runs. Every local
term is made of pairs of factors ``(S, W)``, all summed by two products of them
concatenated (:func:`_symmetric_sum`). When the entries where ``f`` bends (the
tracked arguments of its curved nodes, relu's not counted) are few, ``3 M <= S``, their
``D^1`` comes from ``M`` reverse sweeps (a Jacobian traced with the adjoints) instead of
``S`` forward tangents: a classifier's input Hessian bends only at its logits. The
driver (:mod:`hod._build`) lowers what it emits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import fx
from torch.utils._pytree import TreeSpec, tree_flatten

from ._analysis import node_states
from ._assemble import result_spec, structure
from ._derive import derive, seeded_inputs
from ._emitter import Emitter, Operand
from ._jet import DeriveContext
from ._plan import REVERSE_COST, plain_segments, row_seeds
from ._records import BuildState, Jet, SeedPlan
from ._tracing import op_call_site, trace
from .rules import RULES
from .rules.linalg import _matmul
from .rules.shape import from_end

aten = torch.ops.aten

#: Ops that are linear in each tracked input when at most one input is tracked.
PRODUCTS = frozenset({
    aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default,
    aten.convolution.default, aten.linear.default, aten.dot.default, aten.mv.default,
})

#: Products whose two factors may both be tracked (attention's ``Q K^T`` and ``P V``): the
#: positions of the factors among the node's tensor arguments (:func:`_tensor_args`).
#: Their local term is :func:`_bilinear_term`; the other products with both factors tracked
#: (a convolution of a tracked image by a tracked kernel) leave the Hessian to reverse-last.
BILINEAR = {
    aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
    aten.dot.default: (0, 1), aten.mv.default: (0, 1),
}

#: Ops linear in their tracked inputs (their rules give no second-order term).
LINEAR = PRODUCTS | frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.slice.Tensor, aten.select.int, aten.index.Tensor, aten.cat.default,
    aten.stack.default, aten.sum.dim_IntList, aten.sum.default, aten.mean.dim,
    aten.mean.default, aten.clone.default, aten.alias.default, aten._to_copy.default,
    aten.constant_pad_nd.default, aten.flip.default, aten.roll.default,
    aten.diag_embed.default, aten.diagonal.default, aten.gather.default,
    aten.avg_pool2d.default, aten.avg_pool1d.default, aten.full_like.default,
    aten.zeros_like.default, aten.ones_like.default, aten.split_with_sizes.default,
    aten.split.Tensor, aten.unbind.int, aten.detach.default,
})


#: Curved ops that are not elementwise but small where they occur (a classifier's last
#: layer): their local term is their rule's second derivative along every seed pair,
#: ``(S, S) + out.shape``, summed against the adjoint.
COUPLED = frozenset({aten._log_softmax.default, aten._softmax.default})


def adjoint_hessian(
    state: BuildState, shapes: Sequence[tuple[int, ...]]
) -> tuple[Emitter, TreeSpec, int] | None:
    """The Hessian of ``f``'s scalar output by local terms: the emitter holding its code
    (outputs emitted), the result's spec and the seed-space size; or None where it does not
    apply or costs more than reverse-last mode (see the module docstring)."""
    request, flat, forward = state.request, state.flat, state.forward
    gm = forward.gm
    if request.order != 2 or forward.n_out != 1:
        return None
    per_example = flat.rows or 1
    if state.out_vals[0].numel() != per_example:
        return None
    tracked = _tracked(gm, flat.diff)
    curved = _curved_nodes(gm, tracked, products=True)
    if curved is None:
        return None
    if flat.rows is not None:
        if not _products_keep_rows(curved, flat.rows):
            return None
        seeds = row_seeds(shapes, [])
    else:
        seeds = _batch_seeds(gm, flat.diff, shapes, curved) or SeedPlan(
            tuple(plain_segments(shapes)), ())
    bending = [n for n in curved if not _linear_elementwise(n, tracked)]
    entries = sum(a.meta["val"].numel() for n in bending for a in _tensor_args(n)
                  if a in tracked)
    # Few entries where f bends: their D^1 by reverse mode, one sweep per entry.
    reverse = (flat.rows is None and not seeds.rows
               and 0 < REVERSE_COST * entries <= seeds.size)
    roots = {} if reverse else _separable_roots(gm, tracked, curved)
    curved = [n for n in curved if not any(n in below for below in roots.values())]
    if not reverse and not _pays(gm, tracked, curved, seeds.size, list(roots)):
        return None
    curved = bending if reverse else curved
    adjoint_graph = _trace_adjoints(state, curved, tracked if reverse else None, list(roots))
    return _generate(state, adjoint_graph, curved, seeds, reverse=reverse,
                     tracked=tracked, roots=list(roots))


def _batch_seeds(gm: fx.GraphModule, diff: Sequence[int], shapes: Sequence[tuple[int, ...]],
                 curved: list[fx.Node]) -> SeedPlan | None:
    """Seeds of one row when every differentiated leaf is a batch along dim 0 and every
    curved node keeps its rows apart along dim 0 (its local terms are then per row), or
    None."""
    sizes = {shape[0] if shape else 0 for shape in shapes}
    if len(sizes) != 1 or sizes.pop() < 2:
        return None
    states = node_states(gm, {pos: 0 for pos in diff})
    if any(states.get(node) != 0 for node in curved) or any(
            states.get(a) != 0 for n in curved if n.target in BILINEAR for a in _factors(n)):
        return None
    return row_seeds(shapes, [])


def _products_keep_rows(curved: list[fx.Node], rows: int) -> bool:
    """Whether every :data:`BILINEAR` node among ``curved`` multiplies stacked matrices
    whose leading dim holds the ``rows`` examples (vmap's ``bmm``), so that its local term
    is summed per example like the others."""
    return all(a.meta["val"].dim() == 3 and a.meta["val"].shape[0] % rows == 0
               for n in curved if n.target in BILINEAR for a in [n, *_factors(n)])


def _tracked(gm: fx.GraphModule, diff: Sequence[int]) -> set[fx.Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tracked = {placeholders[i] for i in diff}
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(a in tracked for a in node.all_input_nodes):
            tracked.add(node)
    return tracked


def _curved_nodes(gm: fx.GraphModule, tracked: set[fx.Node], *,
                  products: bool = False) -> list[fx.Node] | None:
    """The elementwise nodes with a tracked input, and with ``products`` the
    :data:`BILINEAR` products of two tracked factors; or None when a node with a tracked
    input is none of these nor linear in it."""
    curved = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in tracked:
            continue
        op, val = node.target, node.meta.get("val")
        if op in PRODUCTS and _both_factors_tracked(node, tracked):
            if not products or op not in BILINEAR:
                return None
            curved.append(node)
            continue
        if op in LINEAR or getattr(op, "__name__", "") == "getitem":
            continue
        if isinstance(val, torch.Tensor) and not _carries_derivative(node):
            continue  # a comparison or an index: no derivative flows through it
        if op in RULES and isinstance(val, torch.Tensor) and (_pointwise(node) or op in COUPLED):
            curved.append(node)
            continue
        return None
    return curved


def _factors(node: fx.Node) -> list[fx.Node]:
    """The two factors of a :data:`PRODUCTS` node (an addmm's or a convolution's bias is
    not one)."""
    left, right = BILINEAR.get(node.target, (0, 1))
    args = _tensor_args(node)
    return [args[left], args[right]] if len(args) > right else args


def _both_factors_tracked(node: fx.Node, tracked: set[fx.Node]) -> bool:
    factors = _factors(node)
    return len(factors) == 2 and all(a in tracked for a in factors)


def _separable_roots(gm: fx.GraphModule, tracked: set[fx.Node],
                     curved: list[fx.Node]) -> dict[fx.Node, set[fx.Node]]:
    """Tracked nodes ``r`` (products, inputs: where elementwise chains start) below which
    ``f`` is separable in ``r``'s entries, with the curved nodes they absorb.

    Below such an ``r``, every node that bends is *aligned* (elementwise, ``r``'s shape,
    its tracked inputs ``r`` or aligned nodes) and every other tracked node linear, so the
    Hessian of ``y`` w.r.t. ``r`` is diagonal and the curved nodes' local terms sum to
    ``D r^T diag(d) D r``, ``d`` that diagonal: one contraction instead of one per node (a
    GLM's loss: its link and log-likelihood are a chain of elementwise ops of ``X w``).
    """
    is_curved = set(curved)
    roots: dict[fx.Node, set[fx.Node]] = {}
    for r in gm.graph.nodes:
        val = r.meta.get("val")
        if (r not in tracked or not isinstance(val, torch.Tensor)
                or not val.dtype.is_floating_point or _pointwise(r)
                or not any(_pointwise(u) and u in is_curved for u in r.users)
                or any(r in below for below in roots.values())):
            continue
        below = _descendants(r, tracked)
        aligned = _aligned(r, below, tracked)
        bends = {n for n in below if n in is_curved and not _linear_elementwise(n, tracked)}
        if len(bends) > 1 and bends <= aligned and all(
                n in aligned or n.target in LINEAR or _linear_elementwise(n, tracked)
                or not _carries_derivative(n) for n in below if n.op == "call_function"):
            roots[r] = {n for n in below if n in is_curved}
    return roots


def _pointwise(node: fx.Node) -> bool:
    op = node.target
    return isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags


def _carries_derivative(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _descendants(root: fx.Node, tracked: set[fx.Node]) -> list[fx.Node]:
    """The tracked nodes reading ``root``, directly or not, in graph order."""
    seen, todo = set(), [root]
    while todo:
        for user in todo.pop().users:
            if user not in seen and user in tracked:
                seen.add(user)
                todo.append(user)
    return [n for n in root.graph.nodes if n in seen]


def _aligned(root: fx.Node, below: list[fx.Node], tracked: set[fx.Node]) -> set[fx.Node]:
    """The nodes of ``below`` whose entry ``i`` depends on entry ``i`` of ``root`` alone:
    elementwise, ``root``'s shape, their derivative-carrying tracked inputs ``root`` or
    aligned."""
    aligned: set[fx.Node] = set()
    shape = root.meta["val"].shape
    for node in below:
        inputs = _tracked_args(node, tracked)
        if (_pointwise(node) and _carries_derivative(node) and node.meta["val"].shape == shape
                and all(a is root or a in aligned for a in inputs)):
            aligned.add(node)
    return aligned


def _pays(gm: fx.GraphModule, tracked: set[fx.Node], curved: list[fx.Node],
          seeds: int, roots: Sequence[fx.Node] = ()) -> bool:
    """Whether the local terms cost less than what they save.

    Per seed, reverse-last mode pushes tangents through the forward and the backward pass,
    about ``2 (P + E)`` for products of ``P`` multiply-adds and ``E`` tracked entries; this
    mode pushes them through the forward pass only, ``P + E``, and adds ``S W`` for local
    terms whose factors are ``W`` wide (:func:`_local_width`).
    """
    local = sum(_local_width(n, tracked, seeds) for n in curved)
    local += sum(r.meta["val"].numel() for r in roots)
    # a product of two tracked factors pushes two tangent products per seed, not one
    second = sum(n.meta["val"].numel() * _inner(n) for n in curved if n.target in BILINEAR)
    return seeds * local < _tracked_work(tracked) + second


def _tracked_work(tracked: set[fx.Node]) -> int:
    """The tracked entries plus the multiply-adds of the tracked products: what one seed
    costs to push through ``f``'s forward pass."""
    work = 0
    for node in tracked:
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.Tensor):
            continue
        work += val.numel()
        if node.target in PRODUCTS:
            work += val.numel() * _inner(node)
    return work


def _inner(node: fx.Node) -> int:
    """How many multiply-adds a :data:`PRODUCTS` node spends on each entry of its result."""
    operand = node.args[0] if node.target is not aten.addmm.default else node.args[1]
    return operand.meta["val"].shape[-1] if operand.meta["val"].dim() else 1


def _local_width(node: fx.Node, tracked: set[fx.Node], seeds: int) -> float:
    """The width of a curved node's local-term factors (:func:`_local_term`), the entries
    each seed pair sums over, plus the per-seed cost of forming them over ``seeds``: a
    product's ``vbar @ DB^T`` (``C.numel * inner`` each), an elementwise node's pairs of
    tracked arguments (the pairs it is linear in left out)."""
    if _linear_elementwise(node, tracked):
        return 0
    if node.target in BILINEAR:
        factors = [a.meta["val"].numel() for a in _factors(node)]
        return min(factors) + node.meta["val"].numel() * _inner(node) / seeds
    numel = node.meta["val"].numel()
    if node.target in COUPLED:
        return numel
    sources = list(dict.fromkeys(_tracked_args(node, tracked)))
    m = len(sources)
    pairs = m * (m + 1) // 2 - sum(_linear_in(node, s) for s in sources)
    return pairs * numel


def _tracked_inputs(node: fx.Node, tracked: set[fx.Node]) -> int:
    """How many floating tensor arguments of ``node`` are tracked."""
    return len(_tracked_args(node, tracked))


def _tracked_args(node: fx.Node, tracked: set[fx.Node]) -> list[fx.Node]:
    """``node``'s tracked tensor arguments that carry a derivative (floating)."""
    return [a for a in _tensor_args(node) if a in tracked and _carries_derivative(a)]


#: Elementwise ops linear in their tracked inputs (``mul``, ``div``: in one of them), or
#: piecewise linear (``relu``: no second derivative off its kink).
_LINEAR_ELEMENTWISE = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.where.self, aten.add.Scalar,
    aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.relu.default,
})


def _linear_elementwise(node: fx.Node, tracked: set[fx.Node]) -> bool:
    """Whether an elementwise node has no second derivative in its tracked inputs (its
    local term would be zero: the cost model leaves it out)."""
    if node.target in _LINEAR_ELEMENTWISE:
        return True
    if node.target is aten.mul.Tensor:
        return _tracked_inputs(node, tracked) == 1
    if node.target is aten.div.Tensor:
        return node.args[1] not in tracked
    return False


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]


def _trace_adjoints(state: BuildState, curved: list[fx.Node],
                    reverse: set[fx.Node] | None = None,
                    roots: Sequence[fx.Node] = ()) -> fx.GraphModule:
    """``f``'s graph returning ``[y, gradients (with values), vbar per curved node, each
    curved node's tensor arguments and output, per separable root the diagonal of the
    Hessian w.r.t. it, per root its value, (Jacobians), aux...]``: the adjoints (and the
    gradient w.r.t. the differentiated leaves) from one reverse sweep of the value, the
    diagonals from two more (:func:`_root_diagonals`).

    With ``reverse`` (the tracked nodes) the Jacobian of the curved nodes' tracked
    arguments w.r.t. each differentiated leaf follows, ``(M,) + leaf.shape`` for their
    ``M`` entries (flattened, concatenated), from ``M`` reverse sweeps."""
    gm, forward = state.forward.gm, state.forward
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = [placeholders[i] for i in state.flat.diff] if state.request.with_values else []
    points = leaves + curved

    def adjoints(*tensors: torch.Tensor) -> list[torch.Tensor]:
        def perturbed(*eps: torch.Tensor):
            seen: list[torch.Tensor] = []
            run = _Perturbed(gm, dict(zip(points, eps, strict=True)), set(curved), seen,
                             roots)
            outs = run.run(*tensors)
            return outs[0], (seen, run.kept, outs[forward.n_out:])

        y, vjp_fn, (seen, kept, aux) = torch.func.vjp(perturbed, *_filled(points, 0),
                                                       has_aux=True)
        diagonals = _root_diagonals(gm, tensors, roots) if roots else []
        jacobians = [] if reverse is None else _entry_jacobians(tensors, reverse)
        return [y, *vjp_fn(torch.ones_like(y)), *seen, *diagonals, *kept, *jacobians, *aux]

    def _entry_jacobians(tensors: tuple, tracked: set[fx.Node]) -> list[torch.Tensor]:
        diff = state.flat.diff
        flags = [a in tracked for n in curved for a in _tensor_args(n)]

        def entries(*leaves: torch.Tensor) -> torch.Tensor:
            values = list(tensors)
            for pos, leaf in zip(diff, leaves, strict=True):
                values[pos] = leaf
            seen: list[torch.Tensor] = []
            _Perturbed(gm, {}, set(curved), seen).run(*values)
            args = [v for v, keep in zip(_arguments(seen, curved), flags, strict=True) if keep]
            return torch.cat([a.reshape(-1) for a in args])

        flat_entries, pull = torch.func.vjp(entries, *[tensors[pos] for pos in diff])
        basis = torch.eye(flat_entries.numel(), dtype=flat_entries.dtype,
                          device=flat_entries.device)
        return list(torch.func.vmap(pull)(basis))

    return trace(adjoints, state.flat.tensors, state.request.call, state.request.allow_random)


def _filled(nodes: Sequence[fx.Node], value: float) -> list[torch.Tensor]:
    """Tensors like each node's value, filled with ``value``."""
    return [torch.full(n.meta["val"].shape, value, dtype=n.meta["val"].dtype,
                       device=n.meta["val"].device) for n in nodes]


def _root_diagonals(gm: fx.GraphModule, tensors: tuple,
                    roots: Sequence[fx.Node]) -> list[torch.Tensor]:
    """Per root, the diagonal of the Hessian of ``y`` (summed over its entries) w.r.t. it:
    the Hessian is diagonal there (:func:`_separable_roots`), so it is the Hessian times
    ones, the gradient of the gradient's sum w.r.t. perturbations of the roots (two
    reverse sweeps: the forward-mode trace would hold ops hod does not derive)."""

    def value(*shifts: torch.Tensor) -> torch.Tensor:
        return _Perturbed(gm, dict(zip(roots, shifts, strict=True)), set(), []).run(
            *tensors)[0].sum()

    def summed_gradients(*eps: torch.Tensor) -> torch.Tensor:
        grads = torch.func.grad(value, argnums=tuple(range(len(roots))))(*eps)
        return sum(g.sum() for g in grads)

    zeros = _filled(roots, 0)
    return list(torch.func.grad(summed_gradients, argnums=tuple(range(len(roots))))(*zeros))


def _arguments(seen: list, curved: list[fx.Node]) -> list:
    """The curved nodes' tensor arguments from what :class:`_Perturbed` saw (their
    arguments and output, node after node)."""
    out, at = [], 0
    for node in curved:
        count = len(_tensor_args(node))
        out += seen[at:at + count]
        at += count + 1
    return out


class _Perturbed(fx.Interpreter):
    """Runs the forward graph adding ``eps[v]`` to each node ``v`` of ``eps``, recording
    each curved node's tensor arguments and (unperturbed) output in ``seen``, and the
    values of the ``kept`` nodes in ``kept``."""

    def __init__(self, gm: fx.GraphModule, eps: dict, curved: set, seen: list,
                 kept: Sequence[fx.Node] = ()) -> None:
        super().__init__(gm)
        self.eps, self.curved, self.seen = eps, curved, seen
        self.keep, self.kept = set(kept), []

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node in self.curved:
            self.seen += [self.env[a] for a in _tensor_args(node)] + [out]
        if node in self.keep:
            self.kept.append(out)
        if node in self.eps:
            return out + self.eps[node]
        return out


def _generate(
    state: BuildState, graph: fx.GraphModule, curved: list[fx.Node], seeds: SeedPlan, *,
    reverse: bool, tracked: set[fx.Node], roots: Sequence[fx.Node] = (),
) -> tuple[Emitter, TreeSpec, int]:
    request, flat = state.request, state.flat
    example = flat.tensors[flat.diff[0]]
    em = Emitter(example.device, example.dtype, request.memory_limit, request.call,
                 compiling=request.compile is not None)
    size = seeds.size
    ctx = DeriveContext(em, 1, size)
    counts = [len(_tensor_args(n)) + 1 for n in curved]
    n_seen = sum(counts)
    n_grads = len(flat.diff) if request.with_values else 0
    first_seen = 1 + n_grads + len(curved)
    needs = ([None] * first_seen + [None if reverse else (0, size)] * n_seen
             + [None] * len(roots) + [(0, size)] * len(roots))
    jets = derive(graph, ctx, seeded_inputs(em, flat, seeds, 0 if reverse else 1),
                  call=request.call, call_site=op_call_site(request, flat), needs=needs)
    after = first_seen + n_seen + 2 * len(roots)
    if reverse:  # the tracked arguments' D^1 from their Jacobians
        jacobians = [j.primal for j in jets[after:after + len(flat.diff)]]
        _seed_from_jacobians(em, ctx, jets[first_seen:after], curved, tracked, jacobians)
        after += len(flat.diff)
    rows = example.shape[0] if seeds.rows else None
    pairs: list[tuple[fx.Node, fx.Node, bool]] = []
    at = first_seen
    for k, node in enumerate(curved):
        args = jets[at:at + counts[k] - 1]
        out = jets[at + counts[k] - 1]
        at += counts[k]
        pairs += _local_term(em, ctx, node, args, out, jets[1 + n_grads + k].primal)
    roots_at = first_seen + n_seen
    for k in range(len(roots)):  # D r^T diag(d) D r
        diagonal, root = jets[roots_at + k].primal, jets[roots_at + len(roots) + k]
        spread = _spread(em, ctx, root, list(em.shape(root.primal)))
        pairs.append((em.mul(spread, diagonal), spread, True))
    total = _symmetric_sum(em, pairs, size, rows) if pairs else None
    gradients = [j.primal for j in jets[1:1 + n_grads]]
    blocks = _blocks(em, state, seeds, jets[0].primal, gradients, total)
    aux = [j.primal for j in jets[after:]]
    em.output(blocks + aux)
    specs = structure(state.forward.out_spec, 1, request.argnums, flat.layouts,
                      request.orders)[1]
    return em, result_spec(specs, request, state.forward.aux_spec), size


def _seed_from_jacobians(em: Emitter, ctx: DeriveContext, seen: list[Jet],
                         curved: list[fx.Node], tracked: set[fx.Node],
                         jacobians: list[fx.Node]) -> None:
    """Give each tracked argument in ``seen`` (the curved nodes' arguments and outputs,
    node after node) its ``D^1``, ``(S,) + shape``: the rows of the Jacobians ``(M,) +
    leaf.shape`` (one per leaf, in seed order) that hold its entries, transposed."""
    whole = em.call(aten.cat.default, [em.reshape(j, [em.shape(j)[0], -1]) for j in jacobians], 1)
    at, row = 0, 0
    for node in curved:
        for argument in _tensor_args(node):
            jet = seen[at]
            at += 1
            if argument not in tracked:
                continue
            count = math.prod(em.shape(jet.primal))
            rows = em.call(aten.slice.Tensor, whole, 0, row, row + count)
            row += count
            d1 = em.reshape(em.call(aten.t.default, rows), [ctx.full_size, *em.shape(jet.primal)])
            jet.derivs[0] = d1
        at += 1  # the node's output


def _local_term(em: Emitter, ctx: DeriveContext, node: fx.Node, args: list[Jet], out: Jet,
                vbar: fx.Node) -> list[tuple[fx.Node, fx.Node, bool]]:
    """``sum_ab sum_i vbar[i] phi_ab[i] D u_a[s, i] D u_b[t, i]`` for one curved node, as
    factor pairs ``(L, R, symmetric)``, ``L`` and ``R`` ``(S,) + dims`` alike: the term is
    the sum of ``L R^T`` over the pairs, plus ``R L^T`` for those not symmetric (a pair of
    distinct arguments), the sums over the dims (per example, within each row) taken by
    :func:`_symmetric_sum`."""
    tracked = [i for i, a in enumerate(args) if not a.is_constant]
    if not tracked:
        return []
    if node.target in BILINEAR:
        return _bilinear_term(em, ctx, node, args, vbar)
    if node.target in COUPLED:
        return _coupled_term(em, ctx, node, args, out, vbar)
    nodes = _tensor_args(node)
    sources = list(dict.fromkeys(nodes[i] for i in tracked))  # one seed per tracked node
    jets = {n: args[nodes.index(n)] for n in sources}
    shape = list(em.shape(out.primal))
    return [(*_weighted_pair(em, ctx, jets[sources[a]], jets[sources[b]], w, shape), a == b)
            for (a, b), w in _second_weights(em, node, sources, args, out, vbar).items()]


def _second_weights(em: Emitter, node: fx.Node, sources: list[fx.Node], args: list[Jet],
                    out: Jet, vbar: fx.Node) -> dict[tuple[int, int], fx.Node]:
    """``vbar * d2 phi / du_a du_b`` of an elementwise ``node`` for its distinct tracked
    arguments ``sources`` (``a <= b``; the pairs it is linear in left out), each of
    ``out``'s shape. A product's come without its rule (``vbar`` on the cross pair, or
    ``2 vbar`` for a square); the others' from the rule run over one unit seed per source,
    ``(m, m) + out.shape``."""
    m = len(sources)
    nodes = _tensor_args(node)
    if node.target is aten.mul.Tensor:
        if m == 2:
            return {(0, 1): vbar}
        return {(0, 0): em.mul(vbar, 2)} if nodes.count(sources[0]) == 2 else {}
    local, derivs = _unit_partials(em, node, sources, args, out.primal, 2)
    second = derivs[1]
    if second is None:
        return {}
    if m > 1:  # one seed pair is its own symmetrization
        second = local.symmetrized(second, 2)
    shape = list(em.shape(out.primal))
    weighted = em.mul(em.expand(local.align(second, 2, len(shape)), [m, m, *shape]), vbar)
    return {(a, b): em.call(aten.select.int, em.call(aten.select.int, weighted, 0, a), 0, b)
            for a in range(m) for b in range(a, m)
            if a != b or not _linear_in(node, sources[a])}


def _unit_partials(em: Emitter, node: fx.Node, sources: list[fx.Node], args: list[Jet],
                  out: fx.Node, order: int) -> tuple[DeriveContext, list[Operand]]:
    """``node``'s rule run to ``order`` over one unit seed per distinct tracked argument in
    ``sources`` (the other arguments constant): its context and its ``D^k``, the node's
    ``k``-th partial derivatives in ``sources``, ``(m,) * k`` seed axes (up to symmetry at
    the top order)."""
    m = len(sources)
    local = DeriveContext(em, order, m)
    eye = em.eye(m, out)
    jets = []
    for n, a in zip(_tensor_args(node), args, strict=True):
        derivs: list[Operand] = [None] * order
        if n in sources:
            unit = em.reshape(em.call(aten.select.int, eye, 0, sources.index(n)),
                              [m] + [1] * em.rank(a.primal))
            derivs[0] = em.expand(unit, [m, *em.shape(a.primal)])
        jets.append(Jet(a.primal, derivs))
    return local, _apply_rule(local, node, jets, out)


def _apply_rule(ctx: DeriveContext, node: fx.Node, jets: list[Jet],
               out: fx.Node) -> list[Operand]:
    """``node``'s rule run on ``jets`` (one per tensor argument, in order)."""
    env = dict(zip(_tensor_args(node), jets, strict=True))
    args = fx.node.map_aggregate(node.args, lambda v: env[v] if isinstance(v, fx.Node) else v)
    kwargs = fx.node.map_aggregate(node.kwargs, lambda v: env[v] if isinstance(v, fx.Node) else v)
    return RULES[node.target](ctx, args, dict(kwargs), out)


def _linear_in(node: fx.Node, source: fx.Node) -> bool:
    """Whether an elementwise ``node`` is linear in its argument ``source`` (its second
    derivative in ``source`` alone is zero): a factor of a product, a dividend."""
    nodes = _tensor_args(node)
    if nodes.count(source) != 1:
        return False
    return node.target is aten.mul.Tensor or (node.target is aten.div.Tensor
                                              and nodes.index(source) == 0)


def _weighted_pair(em: Emitter, ctx: DeriveContext, first: Jet, second: Jet,
                   weight: fx.Node, shape: list[int]) -> tuple[fx.Node, fx.Node]:
    """Factors of ``sum_i weight[i] D first[s, i] D second[t, i]`` (or of its transpose)
    over the entries ``i`` of a node of ``shape`` (``weight``'s shape), its arguments
    broadcast to it. The side times ``weight`` is summed over the dims where the other side
    is broadcast (a layer norm's ``x * rsqrt(v)`` contracts over its rows, not over every
    entry); the side with more entries takes the weight."""
    da, db = (ctx.align(ctx.fit(j, (0, ctx.full_size)).d(1), 1, len(shape))
              for j in (first, second))
    if math.prod(em.shape(da)) < math.prod(em.shape(db)):
        da, db = db, da
    weighted = em.mul(da, weight)
    dims = [d + 1 for d, size in enumerate(em.shape(db)[1:]) if size == 1 and shape[d] != 1]
    if dims:
        weighted = em.sum_dims(weighted, dims, True)
    return weighted, em.expand(db, em.shape(weighted))


def _bilinear_term(em: Emitter, ctx: DeriveContext, node: fx.Node, args: list[Jet],
                   vbar: fx.Node) -> list[tuple[fx.Node, fx.Node, bool]]:
    """The local term of a :data:`BILINEAR` product ``C = A @ B`` (stacked matrices, or a
    matrix and a vector): ``sum_i vbar[i] (DA_s @ DB_t + DA_t @ DB_s)[i]`` is ``T + T^T``
    for ``T[s, t] = <DA_s, vbar @ DB_t^T>``, the pair ``(DA, vbar @ DB^T)``, or
    ``(DA^T @ vbar, DB)`` when that side is smaller; never the ``(S, S) + C.shape`` of
    every seed pair's product. No pairs when a factor is not tracked (it is linear)."""
    left, right = (args[i] for i in BILINEAR[node.target])
    if left.is_constant or right.is_constant:
        return []
    weight = vbar
    if node.target is aten.addmm.default and node.kwargs.get("alpha", 1) != 1:
        weight = em.mul(vbar, node.kwargs["alpha"])
    da, db = (ctx.fit(j, (0, ctx.full_size)).d(1) for j in (left, right))
    if em.rank(left.primal) == 1:  # dot: a row times a column
        da, weight = em.reshape(da, [ctx.full_size, 1, -1]), em.reshape(weight, [1, 1])
    if em.rank(right.primal) == 1:  # dot, mv: times a column
        db = em.reshape(db, [ctx.full_size, -1, 1])
        weight = em.reshape(weight, [*em.shape(weight), 1]) if em.rank(weight) < 2 else weight
    matmul = _matmul(ctx)
    n, k = em.shape(weight)[-2:]
    if n <= k:
        return [(da, matmul(weight, em.call(aten.transpose.int, db, -1, -2)), False)]
    return [(matmul(em.call(aten.transpose.int, da, -1, -2), weight), db, False)]


def _coupled_term(em: Emitter, ctx: DeriveContext, node: fx.Node, args: list[Jet], out: Jet,
                  vbar: fx.Node) -> list[tuple[fx.Node, fx.Node, bool]]:
    """The local term of a :data:`COUPLED` node, a softmax ``p`` or a log-softmax along
    ``dim``: a weighted contraction of its input's centered derivatives, the symmetric
    pair ``(a w, a)``, never the ``(S, S) + out.shape`` of its rule's ``D^2``.

    With ``a = Dx_s - <p, Dx_s>`` and ``b`` likewise for ``t`` (centered along ``dim``),
    softmax's second derivative is ``p a b - p <p, a b>``, so the term is
    ``sum_i w a b`` for ``w = p (vbar - <p, vbar>)``; log-softmax's is minus logsumexp's,
    ``-<p, a b>``, and ``w = -p sum(vbar)``."""
    x = args[0]
    shape = list(em.shape(out.primal))
    dim = from_end(node.args[1], len(shape))
    softmax = node.target is aten._softmax.default
    p = out.primal if softmax else em.call(aten.exp.default, out.primal)
    d = _spread(em, ctx, x, shape)  # (S,) + shape
    centered = em.sub(d, em.sum_dims(em.mul(d, p), [dim], True))
    if softmax:
        weight = em.mul(p, em.sub(vbar, em.sum_dims(em.mul(vbar, p), [dim], True)))
    else:
        weight = em.neg(em.mul(p, em.sum_dims(vbar, [dim], True)))
    return [(em.mul(centered, weight), centered, True)]


def _spread(em: Emitter, ctx: DeriveContext, jet: Jet, shape: list[int]) -> fx.Node:
    """``D^1`` of an argument over every seed, broadcast to the node's output ``shape``."""
    d = ctx.fit(jet, (0, ctx.full_size)).d(1)
    return em.expand(ctx.align(d, 1, len(shape)), [ctx.full_size, *shape])


def _symmetric_sum(em: Emitter, pairs: list[tuple[fx.Node, fx.Node, bool]], size: int,
                   rows: int | None) -> fx.Node:
    """``sum_pairs L R^T``, ``L R^T + R L^T`` for a pair not marked symmetric, over the
    factor pairs ``(L, R, symmetric)`` (``(S,) + dims`` alike within a pair): ``(S, S)``,
    one product for the symmetric pairs concatenated and one for the others; per example
    (``rows``: the dims after ``S`` start with the rows), ``(N, S, S)``."""
    lead = [size] if rows is None else [size, rows]
    total: Operand = None
    for symmetric in (False, True):
        chosen = [(left, right) for left, right, sym in pairs if sym is symmetric]
        if not chosen:
            continue
        left, right = (_concatenated(em, [em.reshape(t, [*lead, -1]) for t in side])
                       for side in zip(*chosen, strict=True))
        x = _contract(em, left, right, rows)
        if not symmetric:
            x = em.add(x, em.call(aten.transpose.int, x, -1, -2))
        total = em.add(total, x)
    return total


def _concatenated(em: Emitter, parts: list[fx.Node]) -> fx.Node:
    """``parts`` joined along their last dim."""
    return em.call(aten.cat.default, parts, -1) if len(parts) > 1 else parts[0]


def _contract(em: Emitter, a: fx.Node, b: fx.Node, rows: int | None) -> fx.Node:
    """``sum_i a[s, i] b[t, i]`` for ``a`` ``(S,) + shape`` and ``b`` ``(T,) + shape``:
    ``(S, T)``; per example (``rows``), ``(N, S, T)``."""
    size_a, size_b = em.shape(a)[0], em.shape(b)[0]
    if rows is None:
        flat_a = em.reshape(a, [size_a, -1 if em.rank(a) > 1 else 1])
        flat_b = em.reshape(b, [size_b, -1 if em.rank(b) > 1 else 1])
        return em.call(aten.mm.default, flat_a, em.call(aten.t.default, flat_b))
    per = math.prod(em.shape(a)[2:])
    flat_a = em.permute(em.reshape(a, [size_a, rows, per]), [1, 0, 2])
    flat_b = em.permute(em.reshape(b, [size_b, rows, per]), [1, 2, 0])
    return em.call(aten.bmm.default, flat_a, flat_b)


def _blocks(em: Emitter, state: BuildState, seeds: SeedPlan, value: fx.Node,
            gradients: list[fx.Node], total: Operand) -> list:
    """The result's blocks, as :func:`hod.derivatives` (or :func:`hod.hessian`) lays them
    out, per example with ``rows``: the value, the ``gradients`` (one per leaf), and the
    Hessian's blocks from ``total`` (zeros when no node is curved)."""
    request, flat = state.request, state.flat
    keys = structure(state.forward.out_spec, 1, request.argnums, flat.layouts,
                     request.orders)[0]
    rows = flat.rows
    lead = [rows] if rows is not None else list(state.out_vals[0].shape)
    blocks = []
    for key in keys:
        if not key.leaves:
            blocks.append(value)
            continue
        if len(key.leaves) == 1:  # a gradient: the leaf's shape, per example with rows
            gradient = gradients[key.leaves[0]]
            blocks.append(gradient if rows is None else em.reshape(
                gradient, lead + list(seeds.segments[key.leaves[0]].sub_shape)))
            continue
        first, second = (seeds.segments[leaf] for leaf in key.leaves)
        dtype = flat.tensors[flat.diff[key.leaves[0]]].dtype
        per_row = seeds.rows and rows is None  # a batch: blocks on its diagonal
        shape = lead + (list(first.shape) + list(second.shape) if per_row
                        else list(first.sub_shape) + list(second.sub_shape))
        if total is None:
            blocks.append(em.zeros(shape, dtype))
            continue
        axis = 1 if seeds.rows else 0
        t = em.call(aten.slice.Tensor, total, axis, first.offset, first.offset + first.size)
        t = em.call(aten.slice.Tensor, t, axis + 1, second.offset,
                    second.offset + second.size)
        if per_row:  # (B, n1, n2) -> (B, n1, B, n2), zero off the batch diagonal
            t = em.call(aten.diag_embed.default, em.permute(t, [1, 2, 0]), 0, -2, -1)
            t = em.permute(t, [2, 0, 3, 1])
        t = em.reshape(t, shape)
        if em.dtype_of(t) != dtype:
            t = em.call(aten._to_copy.default, t, dtype=dtype)
        blocks.append(t)
    return blocks
