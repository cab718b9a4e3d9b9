"""Plan stage: directions and weights that give operators from univariate Taylor jets.

A univariate jet along ``v`` gives ``c_K(v) = sum_{|b|=K} K!/b! v^b d^b f`` (multi-indices
``b``). Mixed partials are fixed linear combinations of such coefficients along a few
integer directions (Griewank, Utke and Walther, "Evaluating higher derivative tensors by
forward propagation of univariate Taylor series", Math. Comp. 2000): this module picks
the directions and solves for the weights at trace time, in float64.

Directions are rows of an ``(R, S)`` tensor over the ``S`` differentiated entries.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch

#: A multi-index as the sorted positions it differentiates by, with repeats.
MultiIndex = tuple[int, ...]


def biharmonic_directions(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions and weights with ``sum_r w_r c_4(v_r) = sum_ij d^4 f / dx_i^2 dx_j^2``.

    ``c_4(e_i + e_j) + c_4(e_i - e_j) = 2 (f_iiii + 6 f_iijj + f_jjjj)``, so with the
    ``S`` unit vectors (weight ``1 - (S - 1)/3``) and ``e_i +- e_j`` for ``i < j``
    (weight ``1/6``) the biharmonic takes ``S^2`` directions.
    """
    eye = torch.eye(size, dtype=torch.float64)
    pairs = list(itertools.combinations(range(size), 2))
    rows = [eye]
    if pairs:
        first = torch.tensor([i for i, _ in pairs])
        second = torch.tensor([j for _, j in pairs])
        rows += [eye[first] + eye[second], eye[first] - eye[second]]
    weights = [torch.full((size,), 1 - (size - 1) / 3, dtype=torch.float64),
               torch.full((2 * len(pairs),), 1 / 6, dtype=torch.float64)]
    return torch.cat(rows), torch.cat(weights)


def operator_directions(
    terms: Mapping[MultiIndex, float], size: int
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Directions ``(R, size)`` and, per order ``k`` present in ``terms``, weights ``(R,)``
    with ``sum_k sum_r w_k[r] c_k(v_r) = sum_a terms[a] d^a f``.

    Each term ``d^a f`` of order ``K`` over the positions ``T`` it names is interpolated
    from the directions ``j >= 0`` over ``T`` with ``|j| = K`` (a square system, solved
    exactly); directions that are multiples of each other are merged
    (``c_K(g v) = g^K c_K(v)``).
    """
    merged: dict[tuple[int, ...], dict[int, float]] = {}
    for index, coefficient in terms.items():
        order = len(index)
        for direction, weight in _interpolation(index):
            dense = [0] * size
            for position, count in direction.items():
                dense[position] = count
            g = math.gcd(*dense)
            primitive = tuple(c // g for c in dense)
            per_order = merged.setdefault(primitive, {})
            per_order[order] = per_order.get(order, 0.0) + coefficient * weight * g**order
    directions = torch.tensor(list(merged), dtype=torch.float64)
    orders = sorted({len(index) for index in terms})
    weights = {k: torch.tensor([w.get(k, 0.0) for w in merged.values()], dtype=torch.float64)
               for k in orders}
    return directions, weights


def _interpolation(index: MultiIndex) -> list[tuple[dict[int, int], float]]:
    """Directions (``{position: count}``) and weights whose ``c_K`` combine to ``d^a f``."""
    support = sorted(set(index))
    order = len(index)
    target = tuple(index.count(p) for p in support)
    compositions = _compositions(order, len(support))
    # c_K(j) = sum_b K!/b! j^b d^b f over the compositions b of K on the support.
    system = torch.tensor(
        [[_multinomial(b) * math.prod(ji**bi for ji, bi in zip(j, b, strict=True))
          for j in compositions] for b in compositions],
        dtype=torch.float64,
    )
    rhs = torch.tensor([float(b == target) for b in compositions], dtype=torch.float64)
    weights = torch.linalg.solve(system, rhs)
    return [
        ({p: c for p, c in zip(support, j, strict=True) if c}, float(w))
        for j, w in zip(compositions, weights, strict=True) if abs(float(w)) > 1e-12
    ]


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """The tuples of ``parts`` non-negative integers summing to ``total``."""
    if parts == 1:
        return [(total,)]
    return [(first, *rest) for first in range(total, -1, -1)
            for rest in _compositions(total - first, parts - 1)]


def _multinomial(b: Sequence[int]) -> float:
    return math.factorial(sum(b)) / math.prod(math.factorial(x) for x in b)
