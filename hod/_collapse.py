"""Derive stage: collapsed Taylor mode, the top coefficient summed over directions.

When only ``sum_r w_r c_K(r)`` of the top coefficient is wanted (the Laplacian: ``K = 2``,
directions ``e_1 .. e_D``, weights one), there is no need to carry ``c_K`` per direction
(Dangel et al., "Collapsing Taylor mode automatic differentiation", NeurIPS 2025). Every
term of a node's ``c_K`` either holds exactly one factor ``c_K`` of an input, entering
linearly through a map ``L`` that does not depend on the direction, or only lower
coefficients (``N(r)``):  ``c_K(r) = L(c_K of the inputs at r) + N(r)``. Hence

    sum_r w_r c_K(r) = L(sum_r w_r c_K of the inputs) + sum_r w_r N(r),

and each node carries its collapsed top ``C`` (shape ``(1,) + value.shape``) beside the
lower coefficients. hod finds both parts with the node's ordinary rule, run twice: once
with the inputs' top coefficients zero, which gives ``N(r)`` over the directions; once
with one direction whose lower coefficients are zero and whose top is the inputs'
collapsed ``C``, which leaves only the linear terms: ``L(C)``. No rule knows about it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from ._emitter import Operand
from ._jet import DeriveContext, TaylorContext
from ._records import Jet, Span

aten = torch.ops.aten

#: ``rule(ctx, args, kwargs)``: a node's derivative lists, one per output.
NodeRule = Callable[[DeriveContext, tuple, dict], list]
#: ``conform(d, out)``: a rule's ``D^K`` for output ``out`` in the shape the ctx expects.
Conform = Callable[[Operand, fx.Node], Operand]


@dataclass
class Collapse:
    """The collapsed tops of the nodes derived so far, and how to collapse.

    ``weights`` is a node of shape ``(R,)`` (None: every weight is one); ``ctx`` runs a
    rule on one collapsed direction (:class:`~hod._jet.TaylorContext` with ``R = 1``).
    ``tops`` maps a value's node to its collapsed top (None when zero).
    """

    ctx: TaylorContext
    weights: fx.Node | None
    tops: dict[fx.Node, object] = field(default_factory=dict)

    @property
    def order(self) -> int:
        return self.ctx.order

    def leaf(self, jet: Jet) -> Jet:
        """A placeholder's jet without its top coefficient, which is collapsed into
        ``tops``."""
        top = jet.derivs[-1]
        self.tops[jet.primal] = None if top is None else self.weighted_sum(top, jet.span)
        return Jet(jet.primal, [*jet.derivs[:-1], None], jet.span)

    def weighted_sum(self, t: fx.Node, span: Span | None) -> fx.Node:
        """``sum_r w_r t[r]`` over the directions ``t``'s leading axis covers (``span``),
        keeping that axis: ``(1,) + t.shape[1:]``: a sum, or one product with the weights."""
        em = self.ctx.em
        shape = list(em.shape(t))
        lo, hi = span or (0, shape[0])
        factors, t = self._direction_free_factors(t)
        if factors:  # sum_r w_r a b[r] = a sum_r w_r b[r] when a is the same for every r
            return em.mul(em.product(factors), self.weighted_sum(t, (lo, hi)))
        repeated = self._unexpanded_product(t)
        if repeated is not None:  # a product of tensors repeated along value dims: sum once
            summed = self.weighted_sum(repeated, (lo, hi))
            return em.expand(summed, [1, *shape[1:]])
        if self.weights is None:  # a sum, whose backward is a view (that of mm is not)
            return em.call(aten.sum.dim_IntList, t, [0], True)
        row = em.reshape(em.call(aten.slice.Tensor, self.weights, 0, lo, hi), [1, hi - lo])
        flat = em.reshape(t, [shape[0], -1])
        return em.reshape(em.call(aten.mm.default, row, flat), [1, *shape[1:]])

    def _unexpanded_product(self, t: fx.Node) -> fx.Node | None:
        """For ``t = a * b`` with ``a``, ``b`` expanded along the same value dims (a seed
        repeated over a batch), the product of what was expanded; else None."""
        em = self.ctx.em
        if t.target is not aten.mul.Tensor or not all(
            isinstance(x, fx.Node) and x.target is aten.expand.default for x in t.args
        ):
            return None
        bases = [x.args[0] for x in t.args]
        if any(em.rank(b) != em.rank(t) or em.shape(b)[0] != em.shape(t)[0] for b in bases):
            return None
        return em.mul(*bases)

    def _direction_free_factors(self, t: fx.Node) -> tuple[list[Operand], fx.Node]:
        """``t`` as a product of factors that broadcast over its direction axis (numbers,
        or nodes of lower rank or of leading size 1), times the rest."""
        em = self.ctx.em
        factors: list[Operand] = []
        while t.target is aten.mul.Tensor:
            rank, a, b = em.rank(t), *t.args
            free = [x for x in (a, b) if not isinstance(x, fx.Node) or em.rank(x) < rank
                    or em.shape(x)[0] == 1 < em.shape(t)[0]]
            if not free or not isinstance(rest := b if free[0] is a else a, fx.Node):
                break
            factors.append(free[0])
            t = rest
        return factors, t

    def node(
        self, args: tuple, kwargs: dict, jets: Sequence[Jet | None], rule: NodeRule | None,
        conform: Conform,
    ) -> None:
        """Collapse the tops of a node's output jets (``jets``, derived with zero input
        tops): record ``L(C) + sum_r w_r N(r)`` in ``tops`` and drop the per-direction top."""
        linear = self._linear_part(args, kwargs, rule, len(jets))
        for jet, top in zip(jets, linear, strict=True):
            if jet is None:
                continue
            spread = jet.derivs[-1]
            jet.derivs[-1] = None
            if spread is not None:
                spread = self.weighted_sum(spread, jet.span)
            top = conform(top, jet.primal)
            self.tops[jet.primal] = self.ctx.em.add(spread, top)

    def _linear_part(
        self, args: tuple, kwargs: dict, rule: NodeRule | None, n_out: int
    ) -> list[Operand]:
        """``L(C)`` for each output: the rule on one direction carrying the inputs'
        collapsed tops only."""
        with_tops = [False]

        def top_only(value: object) -> object:
            if not isinstance(value, Jet):
                return value
            top = self.tops.get(value.primal)
            with_tops[0] |= top is not None
            return Jet(value.primal, [None] * (self.order - 1) + [top])

        args = fx.node.map_aggregate(args, top_only)
        kwargs = fx.node.map_aggregate(kwargs, top_only)
        if not with_tops[0] or rule is None:
            return [None] * n_out
        per_output = rule(self.ctx, args, dict(kwargs))
        return [None if derivs is None else derivs[-1] for derivs in per_output]

    def output(self, jet: Jet) -> Jet:
        """An output's jet with its collapsed top, of shape ``(1,) + value.shape``, as
        ``D^K``."""
        top = self.tops.get(jet.primal)
        return Jet(jet.primal, [*jet.derivs[:-1], top], jet.span)

