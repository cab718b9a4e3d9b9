"""Derive stage: what a rule sees (:class:`DeriveContext`) and the family helpers of rules.

Seed axes lead: the k-th derivative of a value ``v`` has shape ``(S,) * k + v.shape`` and
is symmetric in its first ``k`` axes. Leading seed axes let a primal operand broadcast
against a derivative operand with ordinary right-aligned broadcasting, so most rules are
a plain ATen call on derivative tensors.

``None`` stands for a derivative that is zero by construction (a symbolic zero); rules
drop every term that contains one, so nothing is emitted for it. A value with its
derivative tensors is a :class:`~hod._records.Jet`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import fx

from ._combinatorics import partition_kinds, set_partitions, subset_sizes, subsets
from ._emitter import REALIZE, Emitter, Operand, delta_strides
from ._records import Jet, Span

# A derivative tower ``g^(j)`` of a unary function: ``tower(j)`` gives the j-th derivative
# evaluated at the primal (a node, a Python number, or None when it is zero).
Tower = Callable[[int], Operand]


#: Whether the top order is computed up to symmetry (see ``DeriveContext``).
GROUP_TOP_ORDER = True


class DeriveContext:
    """What a rule sees: the emitter, the order ``n`` and the seed-space size ``S``.

    While a rule runs, every jet it gets covers the same span of seeds, ``span``, and
    ``seed_size`` is that span's width: rules never see spans.

    **The top order up to symmetry.** When ``grouped`` (orders from 2 on),
    ``D^n`` of every value is carried as a tensor whose symmetrization over its ``n`` seed
    axes (the mean over their permutations, :meth:`symmetrized`) is ``D^n``: Faà di Bruno
    and Leibniz sum one term per kind of partition or split (sizes of its blocks), weighted
    by how many there are, instead of one per placement. That is valid because ``D^n`` of a
    result depends on ``D^n`` of its inputs linearly and only through ops on their value
    dims, which commute with permuting seed axes, while its other terms come from the
    exact, symmetric lower orders. Rules that sum every placement themselves stay valid:
    a symmetric tensor is its own symmetrization. Results are symmetrized once, at the end.
    """

    def __init__(self, em: Emitter, order: int, seed_size: int) -> None:
        self.em = em
        self.order = order
        self.full_size = seed_size
        self.span: Span = (0, seed_size)
        self.seed_size = seed_size
        self.grouped = GROUP_TOP_ORDER and order >= 2

    # -- seed axes -------------------------------------------------------------------------
    def axes(self, k: int) -> int:
        """How many leading seed axes ``D^k`` of a value has: ``k``."""
        return k

    def lead(self, k: int) -> list[int]:
        """The leading seed dims of ``D^k`` over the current span."""
        return [self.seed_size] * self.axes(k)

    # -- spans -----------------------------------------------------------------------------
    def span_of(self, jet: Jet) -> Span:
        return jet.span or (0, self.full_size)

    def enter(self, span: Span) -> None:
        """Make ``span`` the span rules work in."""
        self.span = span
        self.seed_size = span[1] - span[0]

    def fit(self, jet: Jet, span: Span) -> Jet:
        """``jet`` with derivatives over exactly ``span``: cut outside it, zero-padded in it.

        A jet that had to be padded keeps its unpadded self in ``narrow``.
        """
        own = self.span_of(jet)
        if own == span or jet.is_constant:
            return jet
        inner = (max(own[0], span[0]), min(own[1], span[1]))
        if inner[0] >= inner[1]:
            return Jet(jet.primal, [None] * self.order, span)
        if inner != own:
            derivs = [self._cut(d, k, own, inner) for k, d in enumerate(jet.derivs, 1)]
            jet = Jet(jet.primal, derivs, inner)
        if inner == span:
            return jet
        derivs = [self.pad(d, k, inner, span) for k, d in enumerate(jet.derivs, 1)]
        return Jet(jet.primal, derivs, span, jet)

    def _cut(self, t: Operand, k: int, own: Span, inner: Span) -> Operand:
        """The part of ``t``'s ``k`` leading seed axes inside ``inner`` (views)."""
        if t is None or inner == own:
            return t
        for axis in range(self.axes(k)):
            t = self.em.call(
                torch.ops.aten.slice.Tensor, t, axis, inner[0] - own[0], inner[1] - own[0]
            )
        return t

    def pad(self, t: Operand, k: int, own: Span, span: Span) -> Operand:
        """Zero-pad ``t``'s ``k`` leading seed axes from ``own`` to ``span``."""
        return self._pad_axes(t, [own] * self.axes(k), span)

    def _pad_axes(self, t: Operand, owns: Sequence[Span], span: Span) -> Operand:
        """Zero-pad each leading seed axis of ``t`` from its own span in ``owns`` to ``span``."""
        if t is None or all(own == span for own in owns):
            return t
        pads = [0, 0] * (self.em.rank(t) - len(owns))
        for own in reversed(owns):
            pads += [own[0] - span[0], span[1] - own[1]]
        return self.em.call(torch.ops.aten.constant_pad_nd.default, t, pads, 0.0)

    # -- placing seed axes -----------------------------------------------------------------
    def place(self, t: Operand, k: int, positions: Sequence[int], m: int, rank: int) -> Operand:
        """View ``t`` (``k`` seed axes, then the value's dims) for broadcasting.

        The result has ``m`` leading axes, ``t``'s seed axes at ``positions`` and 1
        elsewhere, then ones until the value's dims are right-aligned to ``rank`` dims.
        """
        if t is None or not isinstance(t, fx.Node):
            return t
        em = self.em
        value_shape = em.shape(t)[k:]
        lead = [1] * m
        for axis, p in enumerate(positions):
            lead[p] = em.shape(t)[axis]
        return em.reshape(t, lead + [1] * (rank - len(value_shape)) + list(value_shape))

    def align(self, t: Operand, k: int, rank: int) -> Operand:
        """``t``'s ``k`` seed axes kept first, its value dims right-aligned to ``rank``."""
        return self.place(t, k, range(k), k, rank)

    # -- family helpers --------------------------------------------------------------------
    def linear(self, x: Jet, apply: Callable[[fx.Node, int], Operand]) -> list[Operand]:
        """``D^k L(x) = L(D^k x)``; ``apply(t, k)`` applies ``L`` to ``t`` with k seed axes."""
        return [
            None if x.d(k) is None else apply(x.d(k), self.axes(k))
            for k in range(1, self.order + 1)
        ]

    def unary(self, x: Jet, tower: Tower) -> list[Operand]:
        """Faà di Bruno: ``D^m g(x) = sum_P g^(|P|)(x) prod_{B in P} D^|B| x``.

        One term per set partition ``P`` of the m seed positions; a block ``B`` contributes
        ``D^|B| x`` with its seed axes placed at the positions in ``B``.
        """
        return [self.faa_di_bruno(x, tower, m) for m in range(1, self.order + 1)]

    def faa_di_bruno(self, x: Jet, tower: Tower, m: int) -> Operand:
        """The order-``m`` term of :meth:`unary`, which reads ``D^1 x .. D^m x`` only."""
        em = self.em
        rank = em.rank(x.primal)
        terms = []
        for partition, count in self._partitions(m):
            factors = [self.place(x.d(len(b)), len(b), b, m, rank) for b in partition]
            if any(f is None for f in factors):
                continue
            coefficient = tower(len(partition))
            if coefficient is None:
                continue
            terms.append(em.mul(em.mul(count, coefficient), em.product(factors)))
        return em.sum_terms(terms)

    def _partitions(self, m: int):
        """Faà di Bruno's partitions of the ``m`` seed positions, with their weights."""
        if self.grouped and m == self.order:
            return partition_kinds(m)
        return [(partition, 1) for partition in set_partitions(m)]

    def _splits(self, m: int):
        """Leibniz's splits ``(chosen, rest)`` of the ``m`` seed positions, weighted."""
        if self.grouped and m == self.order:
            return subset_sizes(m)
        return [(chosen, rest, 1) for chosen, rest in subsets(m)]

    def symmetrized(self, t: Operand, k: int) -> Operand:
        """The mean of ``t`` over the permutations of its ``k`` leading seed axes.

        Summed a coset at a time: ``u``, symmetric in the axes after the first, then ``u``
        with axis 0 swapped with each of the others; ``k(k-1)/2`` sums in all, not
        ``k! - 1`` (6 for ``k = 4``, not 23).
        """
        if t is None or k < 2:
            return t
        em = self.em
        u = em.mul(t, 1 / math.factorial(k))
        dims = list(range(em.rank(t)))
        for first in range(k - 2, -1, -1):  # u becomes symmetric in axes first..k-1
            swaps = []
            for other in range(first + 1, k):
                swapped = dims.copy()
                swapped[first], swapped[other] = other, first
                swaps.append(em.permute(u, swapped))
            u = em.sum_terms([u, *swaps])
        u.meta[REALIZE] = True
        return u

    def bilinear(
        self, a: Jet, b: Jet, apply: Callable[[Operand, Operand], Operand], rank: int | None
    ) -> list[Operand]:
        """Leibniz: ``D^m B(a, b) = sum_T B(D^|T| a, D^(m-|T|) b)`` over subsets T.

        ``apply`` must broadcast over leading axes. With ``rank`` given, operands' value
        dims are right-aligned to it (elementwise ops); with None they keep their own rank
        (matmul-like ops, which broadcast batch dims themselves).
        """
        result: list[Operand] = []
        for m in range(1, self.order + 1):
            pieces = [
                self._leibniz_term(a, b, chosen, rest, m, apply, rank, count)
                for chosen, rest, count in self._splits(m)
            ]
            result.append(self.sum_pieces(pieces, m))
        return result

    def _leibniz_term(self, a, b, chosen, rest, m, apply, rank, count) -> tuple[Operand, Span]:
        """``count`` times one term, and the span it covers; when one factor is a value, the
        other is taken over its own span. The count scales the smaller factor."""
        if not rest and a.narrow is not None:
            a, own = a.narrow, self.span_of(a.narrow)
        elif not chosen and b.narrow is not None:
            b, own = b.narrow, self.span_of(b.narrow)
        elif _is_identity_seed(b.narrow, rest) or _is_identity_seed(a.narrow, chosen):
            return self._narrow_cross_term(a, b, chosen, rest, m, apply, rank, count), self.span
        else:
            own = self.span
        return self._term(a, b, chosen, rest, m, apply, rank, count, self._not_larger), own

    def _not_larger(self, left: Operand, right: Operand) -> bool:
        return _numel(self.em, left) <= _numel(self.em, right)

    def _term(self, a, b, chosen, rest, m, apply, rank, count, count_left) -> Operand:
        """``count`` times ``apply`` of the two factors (None when one is zero); the count
        scales the left factor when ``count_left(left, right)``, else the right one."""
        left = self.operand(a, chosen, m, rank)
        right = self.operand(b, rest, m, rank)
        if left is None or right is None:
            return None
        if count != 1:
            if count_left(left, right):
                left = self.em.mul(count, left)
            else:
                right = self.em.mul(count, right)
        return apply(left, right)

    def _narrow_cross_term(self, a, b, chosen, rest, m, apply, rank, count) -> Operand:
        """A cross term whose factor on one side is a leaf's identity seed, zero outside
        the leaf's span: that factor is taken over its own span on its axes (so ``apply``
        sees the identity and can place the other factor instead of multiplying; the count
        scales the other factor), and the term is zero-padded to the whole span afterwards."""
        a, b = a.narrow or a, b.narrow or b
        seed_right = _is_identity_seed(b, rest)
        term = self._term(a, b, chosen, rest, m, apply, rank, count, lambda *_: seed_right)
        owns: list[Span] = [self.span] * m
        for positions, jet in ((chosen, a), (rest, b)):
            for p in positions:
                owns[p] = self.span_of(jet)
        return self._pad_axes(term, owns, self.span)

    def sum_pieces(self, pieces: Sequence[tuple[Operand, Span]], k: int) -> Operand:
        """The sum over ``self.span`` of derivatives with ``k`` seed axes, each covering
        its own span (zero outside it).

        With one seed axis the span is cut where pieces start and end, and the parts are
        concatenated: each part is the sum of the pieces covering it (slices, added only
        where pieces overlap), or zeros. That writes the result once, where padding every
        piece to the whole span and adding would write it once per piece and then again.
        """
        em = self.em
        pieces = [(t, own) for t, own in pieces if t is not None]
        if self.axes(k) != 1 or len(pieces) < 2 or len({em.rank(t) for t, _ in pieces}) > 1:
            return em.sum_terms([self.pad(t, k, own, self.span) for t, own in pieces])
        value_shape = list(torch.broadcast_shapes(*(em.shape(t)[1:] for t, _ in pieces)))
        cuts = sorted({self.span[0], self.span[1], *(e for _, own in pieces for e in own)})
        parts = []
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            covering = [
                self._cut(t, 1, own, (lo, hi)) for t, own in pieces if own[0] <= lo and hi <= own[1]
            ]
            part = em.sum_terms(covering)
            if part is None:
                part = em.zeros([hi - lo, *value_shape], em.dtype_of(pieces[0][0]))
            parts.append(em.expand(part, [hi - lo, *value_shape]))
        return parts[0] if len(parts) == 1 else em.call(torch.ops.aten.cat.default, parts, 0)

    def operand(
        self, x: Jet, positions: tuple[int, ...], m: int, rank: int | None = None
    ) -> Operand:
        """``D^|positions| x`` with its seed axes at ``positions`` of ``m`` (the value if
        there are none); see :meth:`place` for ``rank``."""
        k = len(positions)
        if k == 0:
            return x.primal
        t = x.d(k)
        if t is None:
            return None
        value_rank = self.em.rank(x.primal)
        return self.place(t, k, positions, m, value_rank if rank is None else rank)


def _is_identity_seed(narrow: Jet | None, positions: tuple[int, ...]) -> bool:
    """Whether a factor is a leaf's own identity seed, zero outside a narrower span."""
    return narrow is not None and len(positions) == 1 and delta_strides(narrow.d(1)) is not None


def _numel(em: Emitter, t: Operand) -> int:
    return math.prod(em.shape(t)) if isinstance(t, fx.Node) else 1


class TaylorContext(DeriveContext):
    """What a rule sees in Taylor mode: univariate jets along ``R`` directions at once.

    ``D^k`` of a value is its k-th Taylor coefficient along each direction,
    ``c_k(r) = d^k/dt^k v(x + t v_r + ...)`` at ``t = 0``, of shape ``(R,) + value.shape``
    for every ``k``: one leading direction axis instead of ``k`` seed axes. The dense
    formulas hold with every seed position on that one axis, so a rule written for seed
    axes (``place``, ``linear``, Faà di Bruno, Leibniz) computes Taylor coefficients
    unchanged: Faà di Bruno's set partitions group by their block sizes and Leibniz's
    subsets by their size, each kind weighted by how many there are, at every order (a
    univariate coefficient is symmetric already, so nothing is symmetrized afterwards).
    """

    def __init__(self, em: Emitter, order: int, directions: int) -> None:
        super().__init__(em, order, directions)
        self.grouped = False

    def axes(self, k: int) -> int:
        return min(k, 1)

    def place(self, t: Operand, k: int, positions: Sequence[int], m: int, rank: int) -> Operand:
        if t is None or not isinstance(t, fx.Node):
            return t
        em = self.em
        axes = self.axes(k)
        value_shape = list(em.shape(t)[axes:])
        lead = list(em.shape(t)[:axes]) or [1] * self.axes(m)
        return em.reshape(t, lead + [1] * (rank - len(value_shape)) + value_shape)

    def _partitions(self, m: int):
        return partition_kinds(m)

    def _splits(self, m: int):
        return subset_sizes(m)

    def _leibniz_term(self, a, b, chosen, rest, m, apply, rank, count) -> tuple[Operand, Span]:
        """A term with one factor a value keeps the other's own span, as in dense mode; a
        cross term is a product per direction, taken over the whole span (the dense
        identity-seed shortcut places seeds on separate axes, which Taylor mode has not)."""
        if (not rest and a.narrow is not None) or (not chosen and b.narrow is not None):
            return super()._leibniz_term(a, b, chosen, rest, m, apply, rank, count)
        return self._term(a, b, chosen, rest, m, apply, rank, count, self._not_larger), self.span
