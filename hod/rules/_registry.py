"""The rule table: ATen ``OpOverload`` -> derivative rule, filled by family helpers.

A rule is called as ``rule(ctx, args, kwargs, out)``: ``args``/``kwargs`` are the op's
arguments with every tensor replaced by its :class:`~hod._jet.Jet`, ``out`` is the node of
the op's value in the generated graph. It returns ``[D^1 out, ..., D^n out]`` (``None`` for
a symbolic zero), each of shape ``(S,) * k + out.shape`` or broadcastable to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from .._emitter import Operand
from .._jet import DeriveContext, Tower
from .._op_table import registrar

Rule = Callable[[DeriveContext, tuple, dict, fx.Node], list[Operand]]

RULES: dict[Any, Rule] = {}


#: ``@register(*ops)``: use the decorated function as the rule of every op in ``ops``.
register = registrar(RULES, "rules")


def defzero(*ops: Any) -> None:
    """Ops whose derivative is zero everywhere it exists (comparisons, rounding, ...)."""
    register(*ops)(lambda ctx, args, kwargs, out: [None] * ctx.order)


def defunary(op: Any, tower: Callable[[DeriveContext, fx.Node, fx.Node], Tower]) -> None:
    """A unary elementwise op ``out = g(x)``; ``tower(ctx, x, out)(j)`` is ``g^(j)(x)``."""

    def rule(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
        x = args[0]
        return ctx.unary(x, tower(ctx, x.primal, out))

    register(op)(rule)


def defpointwise_linear(*ops: Any) -> None:
    """Ops linear in their first argument that act the same on any leading axes.

    ``D^k out = op(D^k x, *other_args)`` (``clone``, ``neg``, ``mul`` by a number, ...).
    """
    for op in ops:

        def rule(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node, _op=op):
            return ctx.linear(args[0], lambda t, k: ctx.em.call(_op, t, *args[1:], **kwargs))

        register(op)(rule)
