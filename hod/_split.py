"""Split stage: a first linear layer split off, seeded at its output instead of its weight.

When ``f`` reads a differentiated weight ``W`` (``(K, N)``) only in ``h = X @ W``, and
reads ``X`` (``(B, K)``) only there too or does not differentiate it, then
``f(X, W, θ) = g(h, θ)`` with ``h`` bilinear in ``(X, W)``. The derivatives of ``g`` with
respect to ``h`` need ``N`` seeds per example (``h``'s rows are examples, which hod's seed
planner compresses), where those with respect to ``(X, W)`` need ``K + K N``. For an MLP
of width 8 and depth 2 the order-3 pair tensors shrink from ``136^2`` seed pairs to
``72^2``.

The blocks of ``f`` follow from those of ``g`` by the chain rule for a bilinear map.
``h`` has two non-zero derivatives: ``dh[b, n] / dX[b, i] = W[i, n]``,
``dh[b, n] / dW[i, n] = X[b, i]``, and the mixed second one,
``d2h[b, n] / dX[b, i] dW[i, n] = 1``. So a block of ``f`` with slots over ``X``, ``W``
and other inputs is a sum over the partial matchings of its ``X`` slots with its ``W``
slots: each matched pair is one ``h`` slot of ``g``'s block, placed on the diagonal
``i_X = i_W``; each unmatched ``X`` slot is one ``h`` slot contracted with ``W``, each
unmatched ``W`` slot one contracted with ``X``. The terms are emitted into ``g``'s
generated code after its blocks, as products with ``X`` or ``W`` along one dim at a time,
so they are planned with the rest.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from ._emitter import Emitter
from ._records import BlockKey, BuildState

aten = torch.ops.aten


#: Sizes of the derivative tensors of a first linear layer from which it is split off
#: (see :func:`first_layer`), for Hessians and for higher orders.
SPLIT_MIN_ENTRIES_HESSIAN = 4096
SPLIT_MIN_ENTRIES = 65536


@dataclass(frozen=True)
class Split:
    """Where the first linear layer reads its inputs: flat tensors ``x`` and ``w``, whose
    indices in ``flat.diff`` are ``x_diff`` (None when ``X`` is not differentiated) and
    ``w_diff``; ``transposed`` when the layer reads ``W`` as ``(N, K)`` (``X @ W.T``, as
    ``torch.nn.Linear`` does). ``x`` is None when ``X`` is a tensor ``f`` captures,
    ``constant``. ``w_shape`` is the matrix shape the layer views the flat tensor ``w`` as,
    when ``w`` is not that matrix itself (a flat vector of weights, say)."""

    x: int | None
    w: int
    x_diff: int | None
    w_diff: int
    transposed: bool = False
    constant: torch.Tensor | None = field(default=None, compare=False, repr=False)
    w_shape: tuple[int, int] | None = None

    def x_of(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``X`` among ``f``'s flat tensors, or the captured one."""
        return self.constant if self.x is None else tensors[self.x]

    def w_of(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``W`` as the layer reads it from ``f``'s flat tensors: ``(K, N)``, or ``(N, K)``
        when transposed."""
        w = tensors[self.w]
        return w if self.w_shape is None else w.reshape(self.w_shape)


def find_split(gm: fx.GraphModule, diff: Sequence[int]) -> Split | None:
    """The first linear layer of a traced flat function whose weight can be split off.

    ``W`` must be differentiated and read only by one 2-D product ``X @ W`` or
    ``X @ W.T`` (``mm``, or ``addmm`` with a bias), directly or through one view as a
    matrix; its ``X`` is an input too, read only there when it is differentiated, or a
    tensor ``f`` captures.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for w_diff, w in enumerate(diff):
        found = _layer(placeholders[w])
        if found is None:
            continue
        product, transposed, w_shape = found
        x_node = _operands(product)[1]
        if x_node.op == "get_attr":
            constant = getattr(gm, x_node.target)
            return Split(None, w, None, w_diff, transposed, constant, w_shape)
        if x_node.op != "placeholder" or x_node is placeholders[w]:
            continue
        x = placeholders.index(x_node)
        x_diff = diff.index(x) if x in diff else None
        if x_diff is not None and len(x_node.users) != 1:
            continue
        return Split(x, w, x_diff, w_diff, transposed, w_shape=w_shape)
    return None


def first_layer(state: BuildState) -> Split | None:
    """The first linear layer to split off, if ``f`` has one and the request suits: orders
    from 2 (Jacobians are cheap enough), no aux outputs and no random ops (``g`` is
    traced again), and one dtype throughout (the composition does not promote)."""
    request, flat = state.request, state.flat
    if request.order < 2 or request.has_aux or request.allow_random:
        return None
    dtypes = {flat.tensors[pos].dtype for pos in flat.diff} | {v.dtype for v in state.out_vals}
    if len(dtypes) != 1:
        return None
    split = find_split(state.forward.gm, flat.diff)
    if split is None:
        return None
    # The split saves passes over the derivative tensors of X @ W and adds composition
    # calls: below these sizes of those tensors (seeds^(order-1) * numel) the calls cost
    # more (measured on the benchmark's MLPs: orders 3 of width 4 lost 10-20% up to
    # 41K entries and gained from 60K; Hessians gained from 4K).
    x, w = split.x_of(flat.tensors), split.w_of(flat.tensors)
    seeds = w.numel() + sum(
        flat.tensors[pos].numel() for pos in flat.diff if pos not in (split.x, split.w)
    ) + (x.shape[1] if split.x_diff is not None else 0)
    entries = seeds ** (request.order - 1) * x.shape[0] * w.shape[0 if split.transposed else 1]
    return split if entries >= (SPLIT_MIN_ENTRIES_HESSIAN if request.order == 2
                                else SPLIT_MIN_ENTRIES) else None


def _operands(product: fx.Node) -> tuple[object, fx.Node, fx.Node]:
    """``(bias or None, X, W or W.T)`` of an ``mm`` or ``addmm`` node."""
    if product.target == aten.mm.default:
        return None, *product.args
    return tuple(product.args)


def _layer(w: fx.Node) -> tuple[fx.Node, bool, tuple[int, int] | None] | None:
    """The product that is ``w``'s one reader (directly, or through a view as a matrix,
    then one transpose), whether it reads ``w`` transposed, and the shape of that view
    (None without one)."""
    transposed, w_shape = False, None
    reader = _only_user(w)
    if reader is not None and _is_matrix_view(reader, w):
        w_shape, w, reader = tuple(reader.meta["val"].shape), reader, _only_user(reader)
    if reader is not None and _is_transpose(reader, w):
        transposed, w, reader = True, reader, _only_user(reader)
    is_product = reader is not None and not reader.kwargs and (
        reader.target == aten.mm.default
        or (reader.target == aten.addmm.default and len(reader.args) == 3)
    )
    if not is_product or _operands(reader)[2] is not w:
        return None
    return reader, transposed, w_shape


def _is_matrix_view(node: fx.Node, w: fx.Node) -> bool:
    """Whether ``node`` views a tensor ``w`` as a matrix."""
    views = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
    return (node.op == "call_function" and node.target in views and node.args[0] is w
            and node.meta["val"].dim() == 2)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_transpose(node: fx.Node, w: fx.Node) -> bool:
    """Whether ``node`` is ``t(w)``, ``w.permute(1, 0)`` or ``w.transpose(0, 1)`` of a
    matrix ``w``."""
    if node.op != "call_function" or node.args[0] is not w or w.meta["val"].dim() != 2:
        return False
    if node.target == aten.t.default:
        return True
    if node.target == aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return node.target == aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}


def graph_after(gm: fx.GraphModule, split: Split) -> fx.GraphModule:
    """``g``: the traced graph reading ``X @ W`` (or ``X @ W.T``) from one more input,
    ``h``, after the others; an ``addmm``'s bias is added to ``h`` there."""
    nodes = list(gm.graph.nodes)
    product = _layer([n for n in nodes if n.op == "placeholder"][split.w])[0]
    bias = _operands(product)[0]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def reached(node: fx.Node) -> None:
        if node is bias:  # the layer's output, once its bias exists: bias + h
            env[product] = graph.call_function(aten.add.Tensor, (env[node], h))
            env[product].meta = dict(product.meta)

    for node in nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    h = graph.placeholder("h")
    h.meta = dict(product.meta)
    env[product] = h
    for node in nodes:
        if node.op == "placeholder":
            reached(node)
    for node in nodes:
        if node.op != "placeholder" and node is not product:
            env[node] = graph.node_copy(node, env.__getitem__)
            reached(node)
    return fx.GraphModule(gm, graph)


def inner_tensors(tensors: Sequence[torch.Tensor], split: Split) -> list[torch.Tensor]:
    """``g``'s flat inputs: ``h = X @ W``, then ``f``'s (``h`` first: the seed planner
    lays ``g``'s leaves out in this order, and the compressed one first costs less)."""
    w = split.w_of(tensors)
    return [torch.mm(split.x_of(tensors), w.t() if split.transposed else w), *tensors]


@dataclass(frozen=True)
class _Slot:
    """One dim group of a block of ``f``: ``kind`` is ``"x"``, ``"w"`` or ``"o"`` (another
    leaf, ``leaf`` its index in ``g``); ``labels`` name its dims."""

    kind: str
    leaf: int | None
    labels: tuple[str, ...]


class _Labels:
    """Fresh dim names."""

    def __init__(self) -> None:
        self._count = itertools.count()

    def take(self, n: int) -> tuple[str, ...]:
        return tuple(f"d{next(self._count)}" for _ in range(n))


@dataclass(frozen=True)
class Composition:
    """Turns ``g``'s blocks into ``f``'s, in ``g``'s generated code.

    ``keys`` are ``f``'s blocks, in result order; ``mapping[i]`` is the index in ``g`` of
    ``f``'s differentiated leaf ``i`` (None for ``X`` and ``W``); ``inner_keys`` are
    ``g``'s blocks in the order its results list them (orders ``0..n``); ``h_leaf`` is
    ``h``'s index in ``g``; ``leaf_shapes`` the shapes of ``f``'s leaves, ``out_ranks``
    the ranks of its outputs.
    """

    split: Split
    keys: tuple[BlockKey, ...]
    mapping: tuple[int | None, ...]
    inner_keys: tuple[BlockKey, ...]
    h_leaf: int
    leaf_shapes: tuple[tuple[int, ...], ...]
    out_ranks: tuple[int, ...]

    @property
    def leaf_ranks(self) -> tuple[int, ...]:
        return tuple(len(shape) for shape in self.leaf_shapes)

    def slot_rank(self, leaf: int) -> int:
        """The rank of leaf ``leaf``'s dims in a composed block: ``W``'s are the matrix's."""
        if leaf == self.split.w_diff and self.split.w_shape is not None:
            return 2
        return self.leaf_ranks[leaf]

    def __call__(
        self, em: Emitter, inputs: Sequence[fx.Node], results: Sequence[fx.Node], *,
        per_example: bool, compact: bool,
    ) -> list[fx.Node]:
        """``f``'s blocks from ``g``'s ``results``; ``inputs`` are ``g``'s placeholders
        (``h``, then ``f``'s). ``per_example`` says that ``g``'s rows are independent
        examples (its blocks vanish off the diagonal of their ``h`` slots' rows);
        ``compact`` that its blocks hold that diagonal only (``h``'s first slot keeps its
        rows, the others drop them)."""
        split = self.split
        x = (em.constant("x", split.constant) if split.x is None else inputs[1 + split.x])
        w = inputs[1 + split.w]
        if split.w_shape is not None:
            w = em.reshape(w, list(split.w_shape))
        composer = _Composer(em, self, x, w, dict(zip(self.inner_keys, results, strict=True)),
                             per_example=per_example, compact=compact)
        done: dict[BlockKey, fx.Node] = {}
        blocks = []
        for key in self.keys:
            canonical = BlockKey(key.out, tuple(sorted(key.leaves)))
            if canonical not in done:
                block = composer.block(canonical)
                if split.w_shape is not None:  # W's matrix dims back to its leaf's shape
                    out_shape = em.shape(block)[: self.out_ranks[key.out]]
                    leaves = [self.leaf_shapes[leaf] for leaf in canonical.leaves]
                    block = em.reshape(block, [*out_shape, *itertools.chain(*leaves)])
                done[canonical] = block
            dims = _from_canonical(key.leaves, self.leaf_ranks, self.out_ranks[key.out])
            blocks.append(em.permute(done[canonical], dims))
        return blocks


def _from_canonical(
    leaves: tuple[int, ...], leaf_ranks: Sequence[int], out_rank: int
) -> list[int]:
    """The dim permutation taking the block of ``sorted(leaves)`` to that of ``leaves``."""
    canonical = sorted(range(len(leaves)), key=lambda s: leaves[s])
    starts, at = {}, out_rank
    for s in canonical:
        starts[s] = at
        at += leaf_ranks[leaves[s]]
    dims = list(range(out_rank))
    for s, leaf in enumerate(leaves):
        dims += range(starts[s], starts[s] + leaf_ranks[leaf])
    return dims


class _Composer:
    """Emits the blocks of ``f`` (see the module docstring).

    With ``per_example`` (the rows of ``h`` are independent examples), ``g``'s blocks are
    zero unless all their ``h`` slots sit on one example ``b``: a term then
    reads that diagonal and forms the products over ``b`` at once, so that the largest
    blocks (``W`` slots only) are one product ``(K^m, B) @ (B, rest)`` each.
    """

    def __init__(
        self, em: Emitter, plan: Composition, x: fx.Node, w: fx.Node,
        inner: dict[BlockKey, fx.Node], *, per_example: bool, compact: bool,
    ) -> None:
        self.em, self.plan, self.x, self.inner = em, plan, x, inner
        self.per_example, self.compact = per_example, compact
        # W's matrix from h's columns n to X's columns i: dh[b, n] / dX[b, i] = W[i, n]
        self.w_t = w if plan.split.transposed else em.permute(w, [1, 0])

    def _w_dims(self, slot: _Slot) -> tuple[str, str]:
        """The names of a ``W`` slot's ``(i, n)`` dims: ``W`` is ``(K, N)``, or ``(N, K)``
        when the layer reads it transposed."""
        return slot.labels[::-1] if self.plan.split.transposed else slot.labels

    def block(self, key: BlockKey) -> fx.Node:
        """One block of ``f``: the sum over matchings of its ``X`` slots with its ``W``
        slots."""
        em, plan = self.em, self.plan
        names = _Labels()
        out_labels = names.take(plan.out_ranks[key.out])
        slots = []
        for leaf in key.leaves:
            kind = "x" if leaf == plan.split.x_diff else "w" if leaf == plan.split.w_diff else "o"
            slots.append(_Slot(kind, plan.mapping[leaf], names.take(plan.slot_rank(leaf))))
        labels = out_labels + tuple(c for slot in slots for c in slot.labels)
        xs = [s for s, slot in enumerate(slots) if slot.kind == "x"]
        ws = [s for s, slot in enumerate(slots) if slot.kind == "w"]
        # Per example, every term lies on the diagonal of the X slots' example dims: sum
        # the terms there (over one of those dims) and spread the sum once.
        x_rows = [slots[s].labels[0] for s in xs] if self.per_example else []
        target = tuple(c for c in labels if c not in x_rows[1:])
        block = None
        for pairs in _matchings(xs, ws):
            term = self._term(key.out, slots, dict(pairs), out_labels, target, names)
            block = term if block is None else em.call(aten.add.Tensor, block, term)
        if len(x_rows) > 1:
            block = self._embed(block, list(target), labels, [x_rows])
        return block

    def _term(
        self, out: int, slots: list[_Slot], pairs: dict[int, int],
        out_labels: tuple[str, ...], target: tuple[str, ...], names: _Labels,
    ) -> fx.Node:
        """The term of one matching, over the dims ``target``: the block's, but, per
        example, the X slots' example dims after the first."""
        plan, paired_w = self.plan, set(pairs.values())
        g_leaves, g_labels = [], list(out_labels)
        rows: list[str] = []  # the example dim of each h slot
        eaten: list[tuple[fx.Node, str, str]] = []  # (matrix, dim it eats, dim it makes)
        groups: list[list[str]] = []  # dims equal to one another in the term
        for s, slot in enumerate(slots):
            if slot.kind == "o":
                g_leaves.append(slot.leaf)
                g_labels += slot.labels
                continue
            if slot.kind == "w" and s in paired_w:
                continue
            g_leaves.append(plan.h_leaf)
            if slot.kind == "x" and s in pairs:  # d2h[b, j] / dX[b, i] dW[i, j] = 1
                i, j = self._w_dims(slots[pairs[s]])
                pair = [slot.labels[0], j]
                groups.append([slot.labels[1], i])
            elif slot.kind == "x":  # dh[b, n] / dX[b, i] = W[i, n]: W^T maps n to i
                pair = [slot.labels[0], *names.take(1)]
                eaten.append((self.w_t, pair[1], slot.labels[1]))
            else:  # dh[b, j] / dW[i, j] = X[b, i]: X maps b to i
                i, j = self._w_dims(slot)
                pair = [*names.take(1), j]
                eaten.append((self.x, pair[0], i))
            if self.compact and rows:  # g's block holds the first h slot's row only
                g_labels.append(pair[1])
            else:
                g_labels += pair
                rows.append(pair[0])
        g = self.inner[BlockKey(out, tuple(g_leaves))]
        for group in groups:  # the matched i dims: the term is constant along them
            shape = list(self.em.shape(g))
            size = self.em.shape(self.x)[1]
            g = self.em.expand(self.em.reshape(g, [*shape, 1]), [*shape, size])
            g_labels.append(group[0])
        if self.per_example and rows:
            term, term_labels = self._per_example_term(g, g_labels, rows, eaten, slots)
        else:
            # Shrinking products first: the last one writes the term, the largest tensor.
            eaten.sort(key=lambda f: self.em.shape(f[0])[1] / self.em.shape(f[0])[0])
            term, term_labels = self._contract(g, g_labels, eaten)
        return self._embed(term, term_labels, target, groups)

    def _per_example_term(
        self, g: fx.Node, labels: list[str], rows: list[str],
        eaten: list[tuple[fx.Node, str, str]], slots: list[_Slot],
    ) -> tuple[fx.Node, list[str]]:
        """A term from the diagonal of ``g``'s block over its ``h`` slots' examples, and
        its dims' names; its example dim is named by the first ``X`` slot's, if any."""
        em = self.em
        for other in rows[1:]:  # one example dim, last
            g = em.call(aten.diagonal.default, g, 0, labels.index(rows[0]), labels.index(other))
            labels = [c for c in labels if c not in (rows[0], other)] + [rows[0]]
        row = rows[0]
        by_x = [f for f in eaten if f[0] is not self.x]
        g, labels = self._contract(g, labels, by_x)
        made = [f[2] for f in eaten if f[0] is self.x]  # X's i dims, one per W slot
        x_rows = [slot.labels[0] for slot in slots if slot.kind == "x"]
        batch, size = em.shape(self.x)
        product = self.x
        for _ in made[1:]:  # X[b, i1] * X[b, i2] * ...: (B, K, ..., K)
            shape = list(em.shape(product))
            product = em.call(aten.mul.Tensor, em.reshape(product, [*shape, 1]),
                              em.reshape(self.x, [batch] + [1] * (len(shape) - 1) + [size]))
        rest = [c for c in labels if c != row]
        g = em.permute(g, [labels.index(row)] + [labels.index(c) for c in rest])
        flat_g = em.reshape(g, [batch, math.prod(em.shape(g)[1:])])
        if not x_rows:  # no X slot: the product sums over the examples
            flat_p = em.reshape(product, [batch, math.prod(em.shape(product)[1:])])
            term = em.call(aten.mm.default, em.permute(flat_p, [1, 0]), flat_g)
            return (em.reshape(term, [*em.shape(product)[1:], *em.shape(g)[1:]]),
                    [*made, *rest])
        if not made:
            return g, [x_rows[0], *rest]
        flat_p = em.reshape(product, [batch, math.prod(em.shape(product)[1:]), 1])
        term = em.call(aten.bmm.default, flat_p, em.reshape(flat_g, [batch, 1, -1]))
        shape = [batch, *em.shape(product)[1:], *em.shape(g)[1:]]
        return em.reshape(term, shape), [x_rows[0], *made, *rest]

    def _contract(
        self, t: fx.Node, labels: list[str], factors: list[tuple[fx.Node, str, str]]
    ) -> tuple[fx.Node, list[str]]:
        """``t`` times each matrix along the dim it eats; the new dim comes first or last."""
        em = self.em
        for matrix, eats, makes in factors:
            shape = list(em.shape(t))
            d = labels.index(eats)
            rest = shape[:d] + shape[d + 1:]
            rest_labels = labels[:d] + labels[d + 1:]
            size = em.shape(matrix)[1]
            if d == 0:  # (eats, rest) -> (makes, rest)
                flat = em.reshape(t, [shape[0], math.prod(rest)])
                t = em.call(aten.mm.default, em.permute(matrix, [1, 0]), flat)
                t, labels = em.reshape(t, [size, *rest]), [makes, *rest_labels]
            else:  # (rest, eats) -> (rest, makes)
                last = em.permute(t, [*range(d), *range(d + 1, len(shape)), d])
                flat = em.reshape(last, [math.prod(rest), shape[d]])
                t = em.call(aten.mm.default, flat, matrix)
                t, labels = em.reshape(t, [*rest, size]), [*rest_labels, makes]
        return t, labels

    def _embed(
        self, term: fx.Node, term_labels: list[str], labels: tuple[str, ...],
        groups: list[list[str]],
    ) -> fx.Node:
        """``term`` over the block's dims ``labels``: each group of dims holds the term's
        one dim (its first) on its diagonal, zero elsewhere."""
        em = self.em
        term = em.permute(term, [term_labels.index(c) for c in labels if c in term_labels])
        present = [c for c in labels if c in term_labels]
        for group in groups:
            for other in group[1:]:
                first = present.index(group[0])  # the diagonal comes from the last dim
                term = em.permute(term, [*(d for d in range(len(present)) if d != first), first])
                present = [c for c in labels if c in present or c == other]
                term = em.call(aten.diag_embed.default, term, 0, present.index(group[0]),
                               present.index(other))
        return term


def _matchings(xs: list[int], ws: list[int]):
    """Every set of disjoint ``(x slot, w slot)`` pairs, the empty one first."""
    for k in range(min(len(xs), len(ws)) + 1):
        for chosen in itertools.combinations(xs, k):
            for partners in itertools.permutations(ws, k):
                yield list(zip(chosen, partners, strict=True))
