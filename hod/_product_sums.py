"""Trace stage: a sum of matrix products, read as one product over concatenated operands.

``sum_t A_t @ B_t = [A_1 .. A_T] @ [B_1; ..; B_T]``. A weight used at every step of a
recurrent net gets its gradient as such a sum (one outer product per step, added up), and
every derivative of the gradient would repeat the pattern: ``T`` products of seeded
tangents, each as large as the weight times the seeds, and ``T`` sums of them. Read as one
product, the tangents of the operands (small: a step's activations) are concatenated and
multiplied once (an LSTM's parameter Hessian, 1,425 seeds over 10 steps: see
``docs/performance.md``).

The terms may be transposed (``permute(mm(A, B), [1, 0])``); each group of terms with the
same orientation becomes one product.
"""

from __future__ import annotations

import torch
from torch import fx

from ._emitter import graph_call

aten = torch.ops.aten

#: Fewer terms than this are left as they are.
MIN_TERMS = 3


def gather_product_sums(gm: fx.GraphModule) -> None:
    """Rewrite every tree of ``add`` nodes in ``gm`` that sums ``mm`` products (read only
    there) into one ``mm`` per orientation, plus the other terms."""
    graph = gm.graph
    changed = False
    for root in list(graph.nodes):
        if not _is_sum(root) or _feeds_a_sum(root):
            continue
        groups: dict[bool, list[tuple[fx.Node, fx.Node]]] = {False: [], True: []}
        rest = []
        for term in _terms(root):
            found = _product(term)
            if found is None:
                rest.append(term)
            else:
                groups[found[0]].append((term, found[1]))
        if all(len(g) < MIN_TERMS for g in groups.values()):
            continue
        with graph.inserting_before(root):
            parts = list(rest)
            for transposed, group in groups.items():
                if len(group) < MIN_TERMS:
                    parts += [term for term, _ in group]
                    continue
                products = [product for _, product in group]
                left = _side_by_side(graph, [p.args[0] for p in products])
                right = graph_call(graph, aten.cat.default, [p.args[1] for p in products], 0)
                product = graph_call(graph, aten.mm.default, left, right)
                parts.append(graph_call(graph, aten.permute.default, product, [1, 0])
                             if transposed else product)
            total = parts[0]
            for part in parts[1:]:
                total = graph_call(graph, aten.add.Tensor, total, part)
        root.replace_all_uses_with(total)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        gm.recompile()


def _side_by_side(graph: fx.Graph, matrices: list[fx.Node]) -> fx.Node:
    """``[A_1 .. A_T]``; when every ``A_t`` is a transposed row block, the transpose of
    the rows stacked (each block's derivatives then land contiguously, not strided: 2 ms
    a call for the GRU's ``(1073, 48, 10)`` tangent)."""
    if all(_transposed(m) for m in matrices):
        rows = graph_call(graph, aten.cat.default, [m.args[0] for m in matrices], 0)
        return graph_call(graph, aten.permute.default, rows, [1, 0])
    return graph_call(graph, aten.cat.default, matrices, 1)


def _is_sum(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)
            and node.args[0].meta["val"].shape == node.args[1].meta["val"].shape
            == node.meta["val"].shape)


def _feeds_a_sum(node: fx.Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and _is_sum(users[0])


def _terms(root: fx.Node) -> list[fx.Node]:
    """The leaves of the tree of sums ending at ``root`` (inner sums read only there)."""
    terms, todo = [], list(root.args)
    while todo:
        node = todo.pop()
        if _is_sum(node) and len(node.users) == 1:
            todo += node.args
        else:
            terms.append(node)
    return terms


def _product(term: fx.Node) -> tuple[bool, fx.Node] | None:
    """``(transposed, mm node)`` for a term that is an ``mm`` seen through transposes
    (``permute(., [1, 0])``, any number), each read only by the next, else None."""
    transposed, node = False, term
    while _transposed(node):
        if len(node.users) != 1:
            return None
        transposed, node = not transposed, node.args[0]
    if node.target is not aten.mm.default or len(node.users) != 1:
        return None
    return transposed, node


def _transposed(node: fx.Node) -> bool:
    """Whether ``node`` is ``permute(., [1, 0])``."""
    return node.target is aten.permute.default and list(node.args[1]) == [1, 0]
