"""The colourings of :mod:`hod._coloring`, checked by brute force: every pair of columns
sharing a row differs (distance-2), every path on four vertices has three colours (star),
and every non-zero of a random matrix with the pattern comes back exactly from its
compressed product; colour counts on patterns whose optimum is known."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from hod import _coloring
from hod._coloring import (
    DISTANCE2_ORDERS,
    STAR_ORDERS,
    column_coloring,
    hessian_recovery,
    jacobian_recovery,
    row_coloring,
    star_coloring,
)


def from_mask(mask: torch.Tensor) -> torch.Tensor:
    """The coalesced ``(2, nnz)`` pattern of a boolean matrix."""
    return mask.nonzero().T.contiguous()


def banded(n: int, lower: int, upper: int) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j - i <= upper) & (i - j <= lower)


def blocks(n: int, size: int) -> torch.Tensor:
    block = torch.arange(n) // size
    return block[:, None] == block[None, :]


def arrowhead(n: int, hub: int = 0) -> torch.Tensor:
    mask = torch.eye(n, dtype=torch.bool)
    mask[hub] = mask[:, hub] = True
    return mask


def stencil(k: int, nine: bool = False) -> torch.Tensor:
    """The ``k^2 x k^2`` pattern of a 5-point (or 9-point) stencil on a ``k x k`` grid."""
    i, j = torch.arange(k).repeat_interleave(k), torch.arange(k).repeat(k)
    di, dj = (i[:, None] - i[None, :]).abs(), (j[:, None] - j[None, :]).abs()
    return (di <= 1) & (dj <= 1) & ((di + dj <= 1) | nine)


def random_mask(m: int, n: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(m, n, generator=generator) < density


def symmetric(mask: torch.Tensor, diagonal: bool) -> torch.Tensor:
    mask = mask | mask.T
    mask.fill_diagonal_(diagonal)
    return mask


#: Square patterns, used as Jacobians and (symmetrised) as Hessians.
SQUARE = {
    "tridiagonal": banded(30, 1, 1),
    "banded_2_3": banded(40, 2, 3),
    "lower_bidiagonal": banded(25, 1, 0),
    "blocks_4": blocks(32, 4),
    "arrowhead": arrowhead(20),
    "arrowhead_last": arrowhead(20, hub=19),
    "stencil5": stencil(6),
    "stencil9": stencil(5, nine=True),
    "random_sparse": random_mask(40, 40, 0.05, seed=0),
    "random_denser": random_mask(30, 30, 0.2, seed=1),
    "diagonal": torch.eye(15, dtype=torch.bool),
    "empty": torch.zeros(10, 10, dtype=torch.bool),
}
#: Rectangular Jacobian patterns, empty rows and columns included.
RECTANGULAR = {
    "wide": random_mask(12, 40, 0.1, seed=2),
    "tall": random_mask(50, 15, 0.08, seed=3),
    "chain_differences": banded(31, 0, 1)[:30],  # x[1:] - x[:-1]
    "one_dense_row": torch.cat([random_mask(10, 20, 0.1, seed=4), torch.ones(1, 20, dtype=bool)]),
}
JACOBIANS = {**SQUARE, **RECTANGULAR}
HESSIANS = {f"{name}_{'diag' if diagonal else 'nodiag'}": symmetric(mask, diagonal)
            for name, mask in SQUARE.items() for diagonal in (True, False)}


def random_values(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float64 matrix with non-zeros exactly on ``mask``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.where(mask, torch.rand(mask.shape, generator=generator, dtype=torch.float64)
                       + 0.5, 0.0)


def seed_matrix(colors: torch.Tensor) -> torch.Tensor:
    """``S[j, colors[j]] = 1``, ``(n, number of colours)`` float64."""
    count = int(colors.max()) + 1 if colors.numel() else 0
    return torch.nn.functional.one_hot(colors, count).to(torch.float64)


def number_of_colors(colors: torch.Tensor) -> int:
    return int(colors.max()) + 1 if colors.numel() else 0


def assert_distance2(mask: torch.Tensor, colors: torch.Tensor) -> None:
    """No row of ``mask`` holds two columns of one colour (every pair checked)."""
    assert colors.shape == (mask.shape[1],) and colors.dtype == torch.int64
    for row in mask:
        columns = row.nonzero().flatten().tolist()
        for a, b in itertools.combinations(columns, 2):
            assert colors[a] != colors[b], f"columns {a} and {b} share a row and a colour"


def assert_star(mask: torch.Tensor, colors: torch.Tensor) -> None:
    """Neighbours differ, and every path a-b-c-d on four vertices has three colours."""
    n = mask.shape[0]
    neighbours = [set(mask[v].nonzero().flatten().tolist()) - {v} for v in range(n)]
    color = colors.tolist()
    for b in range(n):
        for c in neighbours[b]:
            assert color[b] != color[c], f"neighbours {b} and {c} share colour {color[b]}"
            for a in neighbours[b] - {c}:
                for d in neighbours[c] - {a, b}:
                    path = (a, b, c, d)
                    assert len({color[v] for v in path}) >= 3, f"path {path} is two-coloured"


@pytest.mark.parametrize("order", [*DISTANCE2_ORDERS, "best"])
@pytest.mark.parametrize("name", JACOBIANS)
def test_column_coloring_is_distance2_and_recovers_exactly(name, order):
    mask = JACOBIANS[name]
    pattern = from_mask(mask)
    colors = column_coloring(pattern, tuple(mask.shape), order)
    assert_distance2(mask, colors)
    jacobian = random_values(mask)
    compressed = jacobian @ seed_matrix(colors)
    recovery = jacobian_recovery(pattern, colors)
    assert recovery.shape == (pattern.shape[1],) and recovery.dtype == torch.int64
    assert torch.equal(compressed[pattern[0], recovery], jacobian[pattern[0], pattern[1]])


@pytest.mark.parametrize("order", [*DISTANCE2_ORDERS, "best"])
@pytest.mark.parametrize("name", JACOBIANS)
def test_row_coloring_is_distance2_on_the_transpose(name, order):
    mask = JACOBIANS[name]
    colors = row_coloring(from_mask(mask), tuple(mask.shape), order)
    assert_distance2(mask.T, colors)
    jacobian = random_values(mask)
    compressed = seed_matrix(colors).T @ jacobian
    rows, cols = from_mask(mask)
    assert torch.equal(compressed[colors[rows], cols], jacobian[rows, cols])


@pytest.mark.parametrize("order", [*STAR_ORDERS, "best"])
@pytest.mark.parametrize("name", HESSIANS)
def test_star_coloring_is_a_star_colouring_and_recovers_exactly(name, order):
    mask = HESSIANS[name]
    pattern = from_mask(mask)
    colors = star_coloring(pattern, mask.shape[0], order)
    assert colors.shape == (mask.shape[0],) and colors.dtype == torch.int64
    assert_star(mask, colors)
    upper = random_values(mask)
    hessian = torch.triu(upper) + torch.triu(upper, 1).T
    compressed = hessian @ seed_matrix(colors)
    rows, cols = hessian_recovery(pattern, colors)
    assert torch.equal(compressed[rows, cols], hessian[pattern[0], pattern[1]])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("density", [0.03, 0.08, 0.2])
def test_star_coloring_on_random_graphs(seed, density):
    """Many small random graphs, where two-coloured paths are most likely to slip through."""
    mask = symmetric(random_mask(24, 24, density, seed), diagonal=seed % 2 == 0)
    pattern = from_mask(mask)
    for order in STAR_ORDERS:
        colors = star_coloring(pattern, 24, order)
        assert_star(mask, colors)
        hessian_recovery(pattern, colors)  # raises unless every entry is read alone


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (banded(100, 1, 1), 3),  # each row holds three neighbouring columns
        (banded(100, 2, 3), 6),  # a band of width 6
        (blocks(60, 5), 5),
        (torch.eye(50, dtype=torch.bool), 1),
        (banded(51, 0, 1)[:50], 2),  # x[1:] - x[:-1]
        (stencil(12), 5),  # the 5-point stencil's optimum
        (stencil(12, nine=True), 9),
        (arrowhead(30), 30),  # a dense row: every column its own colour
    ],
    ids=["tridiagonal", "band_6", "blocks_5", "diagonal", "differences", "stencil5",
         "stencil9", "arrowhead"],
)
def test_column_color_counts(mask, expected):
    assert number_of_colors(column_coloring(from_mask(mask), tuple(mask.shape))) == expected


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (arrowhead(200), 2),  # the hub, then every leaf: stars around the hub
        (arrowhead(200, hub=199), 2),
        (banded(100, 1, 1), 3),  # a path needs three colours to be star-coloured
        (blocks(60, 5), 5),  # cliques need as many colours as vertices
        (torch.eye(20, dtype=torch.bool), 1),
        (stencil(12), 5),
    ],
    ids=["arrowhead", "arrowhead_last", "path", "cliques", "diagonal", "stencil5"],
)
def test_star_color_counts(mask, expected, diagonal):
    mask = symmetric(mask, diagonal)
    assert number_of_colors(star_coloring(from_mask(mask), mask.shape[0])) == expected


@pytest.mark.parametrize("k", [3, 4, 5, 6, 8, 20])
def test_dsatur_finds_the_five_point_stencils_optimum(k):
    """Five colours, (i + 2 j) mod 5, on every grid; the static orders give 6 or 7 on some,
    DSATUR 5 on all of these."""
    pattern = from_mask(stencil(k))
    assert number_of_colors(column_coloring(pattern, (k * k, k * k), "dsatur")) == 5
    assert number_of_colors(column_coloring(pattern, (k * k, k * k))) == 5
    assert number_of_colors(row_coloring(pattern, (k * k, k * k))) == 5


def test_star_uses_fewer_colours_than_distance2_on_an_arrowhead():
    mask = arrowhead(50)
    assert number_of_colors(column_coloring(from_mask(mask), (50, 50))) == 50
    assert number_of_colors(star_coloring(from_mask(mask), 50)) == 2


def test_the_best_order_has_the_fewest_colours():
    mask = symmetric(random_mask(60, 60, 0.1, seed=5), diagonal=True)
    pattern = from_mask(mask)
    counts = {order: number_of_colors(star_coloring(pattern, 60, order))
              for order in STAR_ORDERS}
    assert number_of_colors(star_coloring(pattern, 60)) == min(counts.values())
    counts = {order: number_of_colors(column_coloring(pattern, (60, 60), order))
              for order in DISTANCE2_ORDERS}
    assert number_of_colors(column_coloring(pattern, (60, 60))) == min(counts.values())


def graph_of(mask: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """CSR pointers, neighbours and degrees of the graph of a symmetric ``mask``."""
    mask = mask.clone()
    mask.fill_diagonal_(False)
    degree = mask.sum(1).tolist()
    return [0, *torch.cumsum(mask.sum(1), 0).tolist()], mask.nonzero()[:, 1].tolist(), degree


@pytest.mark.parametrize("name", ["random_sparse", "random_denser", "arrowhead_last", "stencil9"])
def test_vertex_orders(name):
    """Natural is 0..n-1; largest-first has degrees non-increasing; smallest-last removes,
    from the last vertex back, a vertex of least degree among those left each time."""
    mask = HESSIANS[f"{name}_nodiag"]
    ptr, adj, degree = graph_of(mask)
    n = len(degree)
    assert _coloring._order("natural", degree, (ptr, adj)) == list(range(n))
    largest = _coloring._order("largest_first", degree, (ptr, adj))
    assert sorted(largest) == list(range(n))
    assert all(degree[a] >= degree[b] for a, b in itertools.pairwise(largest))
    smallest_last = _coloring._order("smallest_last", degree, (ptr, adj))
    assert sorted(smallest_last) == list(range(n))
    left = set(range(n))
    for v in reversed(smallest_last):
        remaining = {u: len(set(adj[ptr[u]:ptr[u + 1]]) & left) for u in left}
        assert remaining[v] == min(remaining.values())
        left.remove(v)


def test_past_max_pairs_columns_are_ranked_by_a_degree_bound(monkeypatch):
    """Without the column intersection graph the colouring stays valid, and only
    smallest-last and DSATUR, which need the graph, are refused."""
    monkeypatch.setattr(_coloring, "MAX_PAIRS", 10)
    mask = stencil(6)
    pattern = from_mask(mask)
    for order in ("best", "natural", "largest_first"):
        assert_distance2(mask, column_coloring(pattern, (36, 36), order))
    for order in ("smallest_last", "dsatur"):
        with pytest.raises(ValueError, match=f"the {order} order needs the conflict graph"):
            column_coloring(pattern, (36, 36), order)


def test_recovery_refuses_a_colouring_that_does_not_separate_the_entries():
    pattern = from_mask(banded(10, 1, 1))
    with pytest.raises(ValueError, match="not distance-2"):
        jacobian_recovery(pattern, torch.arange(10) % 2)
    with pytest.raises(ValueError, match="not a star colouring"):
        hessian_recovery(pattern, torch.arange(10) % 2)  # a proper 2-colouring of a path


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        (torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), "int64"),
        (torch.tensor([0, 1, 2]), r"\(2, nnz\)"),
        (torch.tensor([[0, 5], [1, 0]]), "outside the shape"),
        (torch.tensor([[1, 0], [0, 1]]), "not coalesced"),
        (torch.tensor([[0, 0], [1, 1]]), "not coalesced"),
    ],
    ids=["int32", "one_dim", "out_of_shape", "unsorted", "duplicate"],
)
def test_bad_patterns_are_refused(pattern, match):
    with pytest.raises(ValueError, match=match):
        column_coloring(pattern, (3, 3))
    with pytest.raises(ValueError, match=match):
        star_coloring(pattern, 3)


def test_an_asymmetric_pattern_is_refused():
    pattern = from_mask(banded(5, 0, 1))
    with pytest.raises(ValueError, match="not symmetric"):
        star_coloring(pattern, 5)
    with pytest.raises(ValueError, match="not symmetric"):
        hessian_recovery(pattern, torch.arange(5))


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="order is one of"):
        column_coloring(from_mask(banded(5, 1, 1)), (5, 5), "random")


def test_ten_thousand_variables_colour_quickly():
    """n = 10,000 with about 110,000 non-zeros (a band of 11): each colouring in well under
    a second alone; the bound is generous because the tests share their cores."""
    n = 10_000
    rows = torch.arange(n).repeat_interleave(11)
    cols = rows + torch.arange(-5, 6).repeat(n)
    keep = (cols >= 0) & (cols < n)
    pattern = torch.stack([rows[keep], cols[keep]])
    start = time.perf_counter()
    colors = column_coloring(pattern, (n, n))
    jacobian_recovery(pattern, colors)
    assert number_of_colors(colors) == 11
    star = star_coloring(pattern, n)
    hessian_recovery(pattern, star)
    assert number_of_colors(star) <= 11
    assert time.perf_counter() - start < 20


def test_a_hub_of_ten_thousand_leaves_colours_quickly():
    """A hub's edges are visited once, not once per leaf (which would be 10^8 steps); and a
    dense row does not build the ``n x n`` column intersection graph."""
    n = 10_000
    leaves, hub = torch.arange(n), torch.zeros(n, dtype=torch.int64)
    keys = torch.unique(torch.cat([leaves * n + leaves, hub * n + leaves, leaves * n + hub]))
    pattern = torch.stack([keys // n, keys % n])
    start = time.perf_counter()
    star = star_coloring(pattern, n)
    hessian_recovery(pattern, star)
    assert number_of_colors(star) == 2
    assert number_of_colors(column_coloring(pattern, (n, n))) == n
    assert time.perf_counter() - start < 20
