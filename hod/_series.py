"""API stage: the Taylor input series a call passes, checked and laid out per leaf.

A differentiated argument's *entry* is a path direction ``v`` shaped like the argument
(the path ``x + t v``), or a tuple of coefficients ``(s_1, .., s_j)`` each shaped like it
(``x(t) = x + sum_k s_k t^k / k!``). Internally every differentiated tensor leaf gets a
tuple of coefficients of shape ``(R,) + leaf.shape``: ``R`` directions at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .errors import InputError

#: Per differentiated tensor leaf (positional order), its coefficients ``(R,) + shape``.
LeafSeries = tuple[tuple[torch.Tensor, ...], ...]


def leaf_series(
    call: str, primals: tuple, entries: Sequence[Any], argnums: tuple[int, ...], order: int,
    what: str = "series",
) -> LeafSeries:
    """The coefficients of every differentiated leaf, with a direction axis of size 1.

    ``entries[i]`` belongs to ``primals[argnums[i]]``; leaves come in positional order,
    as :func:`~hod._signature.flatten_call` lists the differentiated leaves.
    """
    per_arg = {}
    for a, entry in zip(argnums, entries, strict=True):
        per_arg[a] = _entry_coefficients(call, a, primals[a], entry, order, what)
    return tuple(coefficients for a in sorted(per_arg) for coefficients in per_arg[a])


def _entry_coefficients(
    call: str, argnum: int, primal: Any, entry: Any, order: int, what: str
) -> list[tuple[torch.Tensor, ...]]:
    """Per leaf of ``primal``, its coefficients from one entry (see the module docstring)."""
    leaves, spec = tree_flatten(primal)
    if tree_flatten(entry)[1] == spec:
        terms = [entry]
    elif isinstance(entry, (tuple, list)) and entry and all(
        tree_flatten(e)[1] == spec for e in entry
    ):
        terms = list(entry)
    else:
        raise InputError(
            f"{call}: the {what} entry for argument {argnum} does not match it.\n"
            f"  Expected: a direction shaped like the argument ({_describe_tree(primal)}), "
            f"or a tuple of up to {order} such coefficients.\n"
            f"  Got: {_describe_tree(entry)}.\n"
            f"  Fix: pass e.g. torch.randn_like(x) for a tensor argument x."
        )
    if len(terms) > order:
        raise InputError(
            f"{call}: the {what} entry for argument {argnum} has {len(terms)} coefficients, "
            f"more than order={order}.\n"
            f"  Fix: pass at most {order} input coefficients (s_1, ..., s_{order}), or raise "
            f"the order."
        )
    per_leaf = [tree_flatten(term)[0] for term in terms]
    result = []
    for j, leaf in enumerate(leaves):
        coefficients = tuple(coefficient_for(call, argnum, leaf, term_leaves[j], k, what)
                             for k, term_leaves in enumerate(per_leaf, 1))
        result.append(tuple(c.unsqueeze(0) for c in coefficients))
    return result


def coefficient_for(
    call: str, argnum: int, primal: torch.Tensor, value: Any, k: int, what: str
) -> torch.Tensor:
    """``value`` checked as coefficient ``k`` of the leaf ``primal``."""
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"{call}: coefficient {k} of the {what} for argument {argnum} is a "
            f"{type(value).__name__}, not a tensor.\n  Fix: pass tensors shaped like the "
            f"argument."
        )
    problems = [
        f"{name} {got} where the argument has {want}"
        for name, got, want in (("shape", tuple(value.shape), tuple(primal.shape)),
                                ("dtype", value.dtype, primal.dtype),
                                ("device", value.device, primal.device))
        if got != want
    ]
    if problems:
        raise InputError(
            f"{call}: coefficient {k} of the {what} for argument {argnum} has "
            f"{'; '.join(problems)}.\n"
            f"  Expected: every direction and coefficient shaped like its argument, with "
            f"its dtype and device.\n"
            f"  Fix: e.g. v = torch.randn_like(x), or v.to(x)."
        )
    return value.contiguous()


def _describe_tree(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    leaves, spec = tree_flatten(value)
    return f"{type(value).__name__} with {len(leaves)} leaves" if leaves else repr(value)


def random_directions(
    call: str, leaves: Sequence[torch.Tensor], samples: Any, distribution: str,
    generator: torch.Generator | None,
) -> LeafSeries:
    """``samples`` random directions per leaf, ``(samples,) + leaf.shape``: Rademacher
    (each entry +-1) or standard normal, drawn from ``generator`` when given."""
    out = []
    for leaf in leaves:
        shape = (samples, *leaf.shape)
        if distribution == "normal":
            v = torch.randn(shape, generator=generator, dtype=leaf.dtype, device=leaf.device)
        else:
            v = torch.randint(0, 2, shape, generator=generator, dtype=leaf.dtype,
                              device=leaf.device).mul_(2).sub_(1)  # no int64 copies
        out.append((v,))
    return tuple(out)
