"""Plan stage: colourings of sparsity patterns, and where each non-zero is read back.

A sparse Jacobian ``J`` (``m x n``) is computed over colours: ``B = J @ S`` with
``S[j, colors[j]] = 1``, one forward direction per colour instead of one per column.
Columns may share a colour when no row holds both (a distance-2 colouring of the
bipartite row/column graph, Curtis-Powell-Reid); then ``J[i, j] = B[i, colors[j]]``.
:func:`row_coloring` is the same on ``J``'s transpose, for reverse mode (``S.T @ J``).

A symmetric Hessian ``H`` (``n x n``) needs fewer colours: a *star* colouring (adjacent
vertices differ, and every path on four vertices uses at least three colours, i.e.
every two-coloured connected subgraph is a star) lets each non-zero be read directly
from ``B = H @ S``: ``H[i, j] = B[i, colors[j]]`` when ``i`` has no other neighbour of
``j``'s colour, else ``B[j, colors[i]]`` (then ``i`` is the hub of the two-coloured star
through the edge and ``j`` a leaf, whose only neighbour of ``i``'s colour is ``i``).
Gebremedhin, Manne and Pothen, "What color is your Jacobian?", SIAM Review 47 (2005),
give both problems and these direct recoveries.

The greedy algorithms, written here:

* distance-2 column colouring: columns in a given order, each taking the smallest
  colour that no column sharing one of its rows has. Each row keeps the colours used in it
  as the bits of a Python int, so a column costs one ``|`` per row it touches: linear in
  the non-zeros, with no ``n x n`` intermediate even for a dense row.
* star colouring: greedy with the invariant of Gebremedhin, Tarafdar, Manne and Pothen,
  "New acyclic and star coloring algorithms with application to computing Hessians",
  SIAM J. Sci. Comput. 29 (2007), section 4: the two-coloured components of the
  coloured vertices stay stars. Instead of their table of stars, each vertex ``w`` of
  colour ``a`` keeps bit sets of the colours among its coloured neighbours (``seen``)
  and of the colours ``c`` for which it is a leaf of an ``(a, c)`` star of two or more
  edges whose hub has colour ``c`` (``leaf``). A vertex ``v`` must avoid its neighbours'
  colours and, for each coloured neighbour ``w`` of colour ``a``: every colour ``w``
  sees when ``v`` has two or more neighbours of colour ``a`` (``v`` would be a hub whose
  leaves already have other partners), else the colours of ``leaf[w]`` (``v`` would hang
  off a leaf of another star). Updating the sets after each vertex costs a few dict
  operations per edge, so the colouring is linear in the edges, times one bit-set
  operation (``colours / 64`` machine words): a hub's edges are visited once, not once per
  leaf as in the 2005 paper's simpler greedy, whose checks walk paths of three edges.

Vertex orders: natural, largest-first (by degree) and smallest-last (Matula and Beck),
and for distance-2 colourings also DSATUR (Brelaz 1979: next, the vertex whose
neighbours show the most colours), which alone finds the 5-point stencil's optimum of 5
colours on every grid tried (the static orders give 5 to 7). Smallest-last and DSATUR
run on the column intersection graph, so only when it is small enough to build
(:data:`MAX_PAIRS`). The colouring with the fewest colours is kept, the earlier order on a
tie; DSATUR did not help star colourings (more colours on random graphs), so they use
the static orders only.

Libraries looked at (issue 19 asks for a well-kept one if one fits): SparseMatrixColorings.jl
(Julia, the colourings behind DifferentiationInterface), ColPack (C++), sparsejac (JAX;
colours with networkx on scipy matrices) and asdex (JAX; its own numpy greedy on JAX
BCOO patterns). None fits a package that depends on torch alone: the first needs a Julia
runtime, the second is C++ that hod would have to compile and ship, the JAX ones bring
JAX, scipy or networkx. The code here is written from the papers above, not from theirs.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Sequence

import torch

#: The vertex orders a star colouring tries, preferred in this order when they tie.
STAR_ORDERS = ("natural", "largest_first", "smallest_last")
#: The orders a distance-2 colouring tries: the same, and DSATUR's dynamic order.
DISTANCE2_ORDERS = (*STAR_ORDERS, "dsatur")
#: The orders that need a Jacobian's column intersection graph.
GRAPH_ORDERS = ("smallest_last", "dsatur")

#: A Jacobian's column intersection graph (for exact degrees and :data:`GRAPH_ORDERS`)
#: is built only when the pairs of non-zeros sharing a row number at most this; past it,
#: largest-first ranks columns by an upper bound of their degree and the graph's orders
#: are left out.
MAX_PAIRS = 1 << 21

Graph = tuple[list[int], list[int]]  # CSR of an undirected graph: (ptr, neighbours)


def column_coloring(
    pattern: torch.Tensor, shape: tuple[int, int], order: str = "best"
) -> torch.Tensor:
    """Colours ``(n,)`` int64 of the columns of an ``m x n`` pattern ``(2, nnz)``, such
    that two columns with a non-zero in one row differ: ``J[i, j] = (J @ S)[i, colors[j]]``
    with ``S[j, colors[j]] = 1``. ``order`` is one of :data:`DISTANCE2_ORDERS`, or
    ``"best"``: the fewest colours of them all."""
    _check_pattern(pattern, shape)
    return _distance2(pattern[1], pattern[0], shape[1], shape[0], order)


def row_coloring(
    pattern: torch.Tensor, shape: tuple[int, int], order: str = "best"
) -> torch.Tensor:
    """Colours ``(m,)`` int64 of the rows of an ``m x n`` pattern ``(2, nnz)``, such that
    two rows with a non-zero in one column differ: ``J[i, j] = (S.T @ J)[colors[i], j]``
    with ``S[i, colors[i]] = 1`` (reverse mode's compression); ``order`` as in
    :func:`column_coloring`."""
    _check_pattern(pattern, shape)
    return _distance2(pattern[0], pattern[1], shape[0], shape[1], order)


def jacobian_recovery(pattern: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """For each non-zero ``k = (i, j)`` of ``pattern`` ``(2, nnz)``, the column of
    ``B = J @ S`` that holds it: ``J[i, j] = B[i, recovery[k]]``; ``(nnz,)`` int64.
    Raises ``ValueError`` if two columns of one colour share a row (no such column)."""
    rows, cols = pattern
    recovery = colors[cols]
    keys = rows * _num_colors(colors) + recovery
    if torch.unique(keys).numel() != keys.numel():
        raise ValueError("jacobian_recovery: the column colouring is not distance-2")
    return recovery


def star_coloring(pattern: torch.Tensor, n: int, order: str = "best") -> torch.Tensor:
    """Colours ``(n,)`` int64 of the ``n`` variables of a symmetric ``n x n`` pattern
    ``(2, nnz)`` (with or without its diagonal): a star colouring of its adjacency graph,
    from which :func:`hessian_recovery` reads every non-zero of ``H @ S`` directly.
    ``order`` is one of :data:`STAR_ORDERS`, or ``"best"``: the fewest colours of them all."""
    _check_pattern(pattern, (n, n))
    rows, cols = pattern
    linear = rows * n + cols
    if not torch.equal(torch.sort(cols * n + rows).values, linear):
        raise ValueError("star_coloring: the pattern is not symmetric")
    off = rows != cols
    ptr = _pointers(rows[off], n)
    graph = (ptr, cols[off].tolist())
    degree = [ptr[v + 1] - ptr[v] for v in range(n)]

    def greedy(name: str) -> list[int]:
        return _star_greedy(graph, _order(name, degree, graph))

    candidates = {name: functools.partial(greedy, name) for name in STAR_ORDERS}
    colors = _best(candidates, order, STAR_ORDERS)
    return torch.tensor(colors, dtype=torch.int64)


def hessian_recovery(
    pattern: torch.Tensor, colors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each non-zero ``k = (i, j)`` of a symmetric ``pattern`` ``(2, nnz)`` (sorted
    row-major), where ``B = H @ S`` holds it alone: ``H[i, j] = B[rows[k], cols[k]]``,
    ``B[i, colors[j]]`` when ``i`` has no other neighbour of ``j``'s colour, else
    ``B[j, colors[i]]``. Two ``(nnz,)`` int64 tensors; raises ``ValueError`` when neither
    holds it alone (``colors`` is no star colouring of the pattern)."""
    rows, cols = pattern
    n = colors.numel()
    linear, flipped = rows * n + cols, cols * n + rows
    transposed = torch.searchsorted(linear, flipped).clamp(max=max(linear.numel() - 1, 0))
    if not torch.equal(linear[transposed], flipped):
        raise ValueError("hessian_recovery: the pattern is not symmetric and sorted row-major")
    keys = rows * _num_colors(colors) + colors[cols]
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    alone = counts[inverse] == 1
    if not bool((alone | alone[transposed]).all()):
        raise ValueError("hessian_recovery: the colouring is not a star colouring")
    return torch.where(alone, rows, cols), torch.where(alone, colors[cols], colors[rows])


def _check_pattern(pattern: torch.Tensor, shape: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless ``pattern`` is ``(2, nnz)`` int64, inside ``shape`` and
    coalesced (sorted row-major, no duplicates)."""
    if pattern.dtype != torch.int64 or pattern.dim() != 2 or pattern.shape[0] != 2:
        raise ValueError(f"a pattern is a (2, nnz) int64 tensor, got {pattern.dtype} "
                         f"{tuple(pattern.shape)}")
    rows, cols = pattern
    if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < shape[0]
                             and 0 <= int(cols.min()) and int(cols.max()) < shape[1]):
        raise ValueError(f"pattern indices fall outside the shape {tuple(shape)}")
    if not bool((torch.diff(rows * shape[1] + cols) > 0).all()):
        raise ValueError("the pattern is not coalesced (sorted row-major, no duplicates)")


def _num_colors(colors: torch.Tensor) -> int:
    """How many colours ``colors`` ``(n,)`` uses (numbered from 0)."""
    return int(colors.max()) + 1 if colors.numel() else 0


def _pointers(groups: torch.Tensor, count: int) -> list[int]:
    """CSR pointers ``(count + 1)`` of the sorted group index ``groups``."""
    sizes = torch.bincount(groups, minlength=count)
    return [0, *torch.cumsum(sizes, 0).tolist()]


def _distance2(
    vertex: torch.Tensor, net: torch.Tensor, n_vertices: int, n_nets: int, order: str
) -> torch.Tensor:
    """Greedy colours of the vertices such that two vertices on one net differ; each
    non-zero ``k`` puts ``vertex[k]`` on ``net[k]``."""
    by_vertex = torch.sort(vertex, stable=True).indices
    ptr, nets = _pointers(vertex[by_vertex], n_vertices), net[by_vertex].tolist()
    graph = _conflict_graph(vertex, net, n_vertices, n_nets)
    if graph is None:
        net_size = torch.bincount(net, minlength=n_nets)
        bound = torch.zeros(n_vertices, dtype=torch.int64).index_add_(0, vertex, net_size[net] - 1)
        degree = bound.tolist()
    else:
        degree = [graph[0][v + 1] - graph[0][v] for v in range(n_vertices)]

    def greedy(name: str) -> list[int]:
        return _distance2_greedy(ptr, nets, n_nets, _order(name, degree, graph))

    names = [name for name in STAR_ORDERS if graph is not None or name not in GRAPH_ORDERS]
    candidates: dict[str, Callable[[], list[int]]] = {
        name: functools.partial(greedy, name) for name in names}
    if graph is not None:
        candidates["dsatur"] = functools.partial(_dsatur, graph)
    colors = _best(candidates, order, DISTANCE2_ORDERS)
    return torch.tensor(colors, dtype=torch.int64)


def _conflict_graph(
    vertex: torch.Tensor, net: torch.Tensor, n_vertices: int, n_nets: int
) -> Graph | None:
    """The graph joining two vertices that share a net, or ``None`` past
    :data:`MAX_PAIRS` pairs of non-zeros on one net. Step ``d`` pairs each member of a
    net with the member ``d`` places after it, so no step holds more than ``nnz`` pairs."""
    by_net = torch.sort(net, stable=True).indices
    members, sorted_net = vertex[by_net], net[by_net]
    sizes = torch.bincount(net, minlength=n_nets)
    if int((sizes * sizes).sum()) > MAX_PAIRS:
        return None
    position = torch.arange(members.numel()) - (torch.cumsum(sizes, 0) - sizes)[sorted_net]
    after = sizes[sorted_net] - 1 - position  # members of the same net after this one
    at, step, keys = torch.nonzero(after > 0).flatten(), 1, []
    while at.numel():
        a, b = members[at], members[at + step]
        keys += [a * n_vertices + b, b * n_vertices + a]
        step += 1
        at = at[after[at] >= step]
    unique = torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.int64)
    return _pointers(unique // n_vertices, n_vertices), (unique % n_vertices).tolist()


def _distance2_greedy(
    ptr: list[int], nets: list[int], n_nets: int, vertices: Sequence[int]
) -> list[int]:
    """Greedy colouring in the order ``vertices``: each takes the smallest colour absent
    from all its nets (``nets[ptr[v]:ptr[v + 1]]``). ``used[i]``'s bits are net ``i``'s
    colours."""
    used = [0] * n_nets
    colors = [0] * len(vertices)
    for v in vertices:
        its_nets = nets[ptr[v]:ptr[v + 1]]
        forbidden = 0
        for i in its_nets:
            forbidden |= used[i]
        color = _lowest_free(forbidden)
        colors[v] = color
        bit = 1 << color
        for i in its_nets:
            used[i] |= bit
    return colors


def _star_greedy(graph: Graph, vertices: Sequence[int]) -> list[int]:
    """Greedy star colouring in the order ``vertices`` (see the module docstring).

    ``first[u * n + c]`` is the first neighbour of ``u`` coloured ``c``, and ``shared``
    holds ``u * n + c`` once ``u`` has two; ``seen[u]``'s bits are the colours among
    ``u``'s coloured neighbours, ``leaf[u]``'s the colours ``c`` such that ``u`` is a leaf
    of a star of two or more edges coloured ``(colors[u], c)`` whose hub has colour ``c``.
    """
    ptr, adj = graph
    n = len(vertices)
    colors = [-1] * n
    first: dict[int, int] = {}
    shared: set[int] = set()
    seen, leaf = [0] * n, [0] * n
    for v in vertices:
        neighbours = adj[ptr[v]:ptr[v + 1]]
        forbidden = 0
        for w in neighbours:
            a = colors[w]
            if a >= 0:  # past one neighbour coloured a, v would be the hub of an (a, .) star
                forbidden |= (1 << a) | (seen[w] if v * n + a in shared else leaf[w])
        c = _lowest_free(forbidden)
        colors[v] = c
        for u in neighbours:
            key = u * n + c
            seen[u] |= 1 << c
            spoke = first.setdefault(key, v)
            a = colors[u]
            if spoke != v:  # u is the hub of a (colors[u], c) star: v, and its first spoke,
                shared.add(key)  # are leaves
                if a >= 0:
                    leaf[v] |= 1 << a
                    leaf[spoke] |= 1 << a
            elif a >= 0 and v * n + a in shared:  # v is the hub: u is a leaf
                leaf[u] |= 1 << c
    return colors


def _best(candidates: dict[str, Callable[[], list[int]]], order: str,
          valid: tuple[str, ...]) -> list[int]:
    """The colouring of the candidate named ``order`` or, for ``"best"``, the one with the
    fewest colours (the earlier on a tie); ``valid`` names every order there may be."""
    if order != "best" and order not in valid:
        raise ValueError(f"order is one of {valid} or 'best', got {order!r}")
    if order != "best" and order not in candidates:
        raise ValueError(f"the {order} order needs the conflict graph, which has more than "
                         f"MAX_PAIRS = {MAX_PAIRS} pairs here: choose another order")
    names = tuple(candidates) if order == "best" else (order,)
    return min((candidates[name]() for name in names), key=lambda colors: max(colors, default=-1))


def _lowest_free(bits: int) -> int:
    """The smallest colour whose bit is clear in ``bits``."""
    return (~bits & (bits + 1)).bit_length() - 1


def _order(name: str, degree: list[int], graph: Graph | None) -> list[int]:
    """The vertices in the static order ``name`` (one of :data:`STAR_ORDERS`)."""
    if name == "natural":
        return list(range(len(degree)))
    if name == "largest_first":
        return sorted(range(len(degree)), key=lambda v: -degree[v])
    return _smallest_last(graph, degree)


def _dsatur(graph: Graph) -> list[int]:
    """Brelaz's DSATUR colouring of ``graph``: next, the uncoloured vertex whose neighbours
    show the most colours (then the larger degree, then the smaller index) takes the
    smallest colour none of them has. A heap with stale entries skipped on the way out."""
    ptr, adj = graph
    n = len(ptr) - 1
    colors, seen = [-1] * n, [0] * n
    heap = [(0, ptr[v] - ptr[v + 1], v) for v in range(n)]  # (-saturation, -degree, v)
    heapq.heapify(heap)
    while heap:
        saturation, _, v = heapq.heappop(heap)
        if colors[v] >= 0 or -saturation != seen[v].bit_count():
            continue
        colors[v] = c = _lowest_free(seen[v])
        for u in adj[ptr[v]:ptr[v + 1]]:
            if colors[u] < 0 and not seen[u] >> c & 1:
                seen[u] |= 1 << c
                heapq.heappush(heap, (-seen[u].bit_count(), ptr[u] - ptr[u + 1], u))
    return colors


def _smallest_last(graph: Graph, degree: list[int]) -> list[int]:
    """Matula and Beck's smallest-last order: repeatedly remove a vertex of least degree
    in what remains; colour in the reverse order of removal."""
    ptr, adj = graph
    n = len(degree)
    remaining = list(degree)
    buckets: list[list[int]] = [[] for _ in range(max(degree, default=0) + 1)]
    for v in range(n):
        buckets[remaining[v]].append(v)
    removed = [False] * n
    order: list[int] = []
    low = 0
    while len(order) < n:
        while not buckets[low]:
            low += 1
        v = buckets[low].pop()
        if removed[v] or remaining[v] != low:
            continue  # a stale entry: v moved to a lower bucket or is gone
        removed[v] = True
        order.append(v)
        for u in adj[ptr[v]:ptr[v + 1]]:
            if not removed[u]:
                remaining[u] -= 1
                buckets[remaining[u]].append(u)
                if remaining[u] < low:
                    low = remaining[u]
    order.reverse()
    return order
