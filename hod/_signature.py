"""API stage: a call ``f(*args, **kwargs)`` flattened into tensors and a hashable signature.

The signature is the cache key: the pytree structure of the arguments, every tensor
leaf's shape, dtype and device, and the value of every non-tensor leaf (those are baked
into the generated code as constants).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._records import ArgLayout, FlatCall
from .errors import InputError


class _Identity:
    """Keys an unhashable argument by identity, holding it so its id cannot be reused."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return _Identity(value)
    return (type(value), value)


def call_signature(args: tuple, kwargs: dict) -> tuple[tuple[torch.Tensor, ...], Hashable]:
    """The tensor leaves of a call (contiguous) and its cache key, as cheaply as possible.

    Calls whose arguments are all tensors take a fast path; others flatten the pytree.
    Both give the same tensors, in the order :func:`flatten_call` lists them.
    """
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        key = tuple((a.shape, a.dtype, a.device) for a in args)
        return tuple(a.contiguous() for a in args), key
    leaves, spec = tree_flatten((args, kwargs))
    key = (
        spec,
        tuple(
            (leaf.shape, leaf.dtype, leaf.device)
            if isinstance(leaf, torch.Tensor)
            else _hashable(leaf)
            for leaf in leaves
        ),
    )
    # Code is traced for contiguous inputs: a traced `reshape` may have become a `view`.
    tensors = tuple(leaf.contiguous() for leaf in leaves if isinstance(leaf, torch.Tensor))
    return tensors, key


def flatten_call(
    args: tuple, kwargs: dict, argnums: tuple[int, ...], call: str
) -> FlatCall:
    """Flatten a call; checks that every differentiated leaf is a floating tensor."""
    leaves, spec = tree_flatten((args, kwargs))
    per_arg = [tree_flatten(a) for a in args]
    tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    slot_of_leaf = {leaf_index: slot for slot, leaf_index in enumerate(tensor_pos)}

    diff: list[int] = []
    layouts: dict[int, ArgLayout] = {}
    start = 0
    for a, (arg_leaves, arg_spec) in enumerate(per_arg):
        if a in argnums:
            ids = []
            for j, leaf in enumerate(arg_leaves):
                _check_differentiable(leaf, a, j, call)
                ids.append(len(diff))
                diff.append(slot_of_leaf[start + j])
            layouts[a] = ArgLayout(arg_spec, tuple(ids))
        start += len(arg_leaves)

    def rebuild(tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
        filled = list(leaves)
        for slot, leaf_index in enumerate(tensor_pos):
            filled[leaf_index] = tensors[slot]
        return tree_unflatten(filled, spec)

    tensors, key = call_signature(args, kwargs)
    return FlatCall(tensors, tuple(diff), layouts, key, rebuild)


def _check_differentiable(leaf: Any, argnum: int, index: int, call: str) -> None:
    where = f"argument {argnum}" + (f" (leaf {index})" if index else "")
    if not isinstance(leaf, torch.Tensor):
        raise InputError(
            f"{call}: {where} is differentiated but is a {type(leaf).__name__}, not a tensor.\n"
            f"  Expected: a floating-point tensor, or a pytree (dict/list/tuple) of them.\n"
            f"  Fix: pass it as a tensor, or leave it out of argnums."
        )
    if not leaf.dtype.is_floating_point:
        raise InputError(
            f"{call}: {where} is differentiated but has dtype {leaf.dtype}.\n"
            f"  Expected: a real floating-point tensor (float16/bfloat16/float32/float64).\n"
            f"  Fix: convert it, e.g. `x.double()`, or leave it out of argnums."
        )
