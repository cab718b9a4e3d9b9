"""API stage: a transform called under ``torch.func.vmap`` runs hod's own batched code.

Under ``vmap`` a hod function's arguments arrive wrapped by functorch, and its unbatched
generated code would run through functorch's batching rules, one batched ATen call per
node. The examples of a vmap are independent by construction, which hod can use: the
arguments are unwrapped at every vmap level on top of the transform stack (nested vmaps
become one leading dim of ``N = B_1 * ... * B_k`` examples), ``vmap(f)`` is traced over
them, and the generated code seeds one example (:func:`hod._plan.row_seeds`), reading
each block per example, ``(N,) + block``. The results are wrapped back at the levels the
arguments came from, where vmap expects them.

An argument unbatched at a level keeps ``in_dims=None`` there, except a differentiated
one (and a Taylor series), which is expanded over the examples: every example then
differentiates its own copy, so the per-example gradients of reverse mode stay apart.
Tensors the examples share by nothing else stay unbatched.

What runs instead (functorch's batching of the unbatched code): a transform stack whose
top is not a vmap (``vmap(grad(hod...))``: hod's code runs under ``grad`` as before), and
a call whose batched code cannot be built (an op the vmapped trace meets without a rule,
a batching rule that cannot be traced); the levels below the first vmap whose
``randomness`` differs from the top one's are left to functorch as well.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch._C._functorch import _add_batch_dim, _unwrap_batched, maybe_current_level
from torch._functorch.pyfunctorch import VmapInterpreter, retrieve_all_functorch_interpreters
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


class Examples:
    """One call's arguments unwrapped from the vmap levels on top of the transform stack.

    ``args`` and ``kwargs`` hold plain tensors (or tensors of the transforms further
    down): a batched leaf is ``(N,) + its per-example shape``, or ``(R, N) + ...`` for a
    Taylor series (the series argument keeps its directions first), an unbatched one is
    as the caller passed it. ``in_dims`` is the matching tree of 0, 1 or None, and
    ``key`` tells calls apart that share the unwrapped signature but not ``in_dims``.
    """

    def __init__(self, levels: list[VmapInterpreter], fronts: list[Any], args: tuple,
                 kwargs: dict, expand: Callable[[int], bool], series: int | None) -> None:
        self.levels = levels  # top first
        self.sizes = [level.batch_size() for level in reversed(levels)]  # bottom first
        self.n = math.prod(self.sizes)
        self.randomness = levels[0].randomness()
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            positional: Sequence[int | None] = range(len(args))
            spec = None
        else:
            leaves, spec = tree_flatten((args, kwargs))
            positional = [a for a, arg in enumerate(args) for _ in tree_flatten(arg)[0]]
            positional += [None] * (len(leaves) - len(positional))
        dims, unwrapped, k = [], [], len(levels)
        for front, a in zip(fronts, positional, strict=True):
            if not isinstance(front, tuple):  # not a tensor
                dims.append(None)
                unwrapped.append(front)
                continue
            t, batched = front
            if not batched and not (a is not None and (expand(a) or a == series)):
                dims.append(None)
                unwrapped.append(t.view(t.shape[k:]))
                continue
            if tuple(t.shape[:k]) != tuple(self.sizes):
                t = t.expand(*self.sizes, *t.shape[k:])
            if k > 1:
                t = t.reshape(self.n, *t.shape[k:])
            dim = 1 if a == series else 0
            dims.append(dim)
            unwrapped.append(t.movedim(0, 1) if dim else t)
        if spec is None:
            self.args, self.kwargs = tuple(unwrapped), {}
            self.in_dims = (tuple(dims), {})
        else:
            self.args, self.kwargs = tree_unflatten(unwrapped, spec)
            self.in_dims = tree_unflatten(dims, spec)
        self.key: Hashable = ("examples", self.randomness, tuple(dims))

    def vmapped(self, f: Callable) -> Callable:
        """``f`` over ``args`` and ``kwargs`` shaped like these: ``vmap(f)`` with outputs
        ``(N,) + ...``."""
        args_dims, kwargs_dims = self.in_dims

        def over_examples(*args: Any, **kwargs: Any) -> Any:
            return torch.func.vmap(
                lambda a, k: f(*a, **k), in_dims=(args_dims, kwargs_dims),
                randomness=self.randomness,
            )(args, kwargs)

        return over_examples

    def below(self) -> contextlib.AbstractContextManager:
        """The transform stack without the vmap levels: the batched code runs there."""
        if len(self.levels) == 1:
            return self.levels[0].lower()
        stack = contextlib.ExitStack()
        for level in self.levels:
            stack.enter_context(level.lower())
        return stack

    def wrap(self, results: Any) -> Any:
        """Results ``(N,) + ...`` as the vmap levels expect them: each example's own."""
        if isinstance(results, torch.Tensor):
            return self._wrap(results)
        return tree_map(self._wrap, results)

    def _wrap(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if len(self.sizes) > 1:
            t = _split_examples(t, self.sizes)
        for level in reversed(self.levels):  # the bottom level's dim is first
            t = _add_batch_dim(t, 0, level.level())
        return t


def _split_examples(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``(N,) + shape`` as ``sizes + shape``; a sparse COO tensor by its indices (torch
    reshapes no sparse tensor)."""
    if t.layout is not torch.sparse_coo:
        return t.reshape(*sizes, *t.shape[1:])
    indices = t.indices()
    split = torch.stack(torch.unravel_index(indices[0], sizes))
    return torch.sparse_coo_tensor(torch.cat([split, indices[1:]]), t.values(),
                                   (*sizes, *t.shape[1:]), is_coalesced=t.is_coalesced(),
                                   check_invariants=False)


def examples_of(args: tuple, kwargs: dict, expand: Callable[[int], bool],
                series: int | None = None) -> Examples | None:
    """The call's examples when it is made under vmap levels that batch an argument.

    ``expand(a)``: positional argument ``a`` is differentiated (batched over the examples
    even where vmap does not batch it); ``series``: the positional argument holding a
    Taylor series (directions first), or None.
    """
    if maybe_current_level() is None:
        return None
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        leaves: Sequence[Any] = args
    else:
        leaves = tree_flatten((args, kwargs))[0]
    levels, fronts = _unwrapped(leaves)
    if not levels:
        return None
    return Examples(levels, fronts, args, kwargs, expand, series)


def _unwrapped(leaves: Sequence[Any]) -> tuple[list[VmapInterpreter], list[Any]]:
    """The vmap levels on top of the stack (top first), down to the first one that is not
    a vmap, batches none of ``leaves`` or draws random numbers differently; and per leaf,
    a tensor's ``(t, batched)``: ``t`` unwrapped at those levels with one leading dim per
    level, bottom first (of size 1 where it is not batched), ``batched`` whether it is
    batched at any of them (any other leaf is kept as it is)."""
    levels: list[VmapInterpreter] = []
    current = list(leaves)
    batched = [False] * len(leaves)
    for interpreter in reversed(retrieve_all_functorch_interpreters()):
        if not isinstance(interpreter, VmapInterpreter) or (
            levels and interpreter.randomness() != levels[0].randomness()
        ):
            break
        level = interpreter.level()
        step = [_unwrap_batched(t, level) if isinstance(t, torch.Tensor) else (t, None)
                for t in current]
        if all(dim is None for _, dim in step):
            break
        levels.append(interpreter)
        for i, (t, dim) in enumerate(step):
            if isinstance(t, torch.Tensor):
                current[i] = t.unsqueeze(0) if dim is None else t if dim == 0 else t.movedim(
                    dim, 0)
                batched[i] = batched[i] or dim is not None
    fronts = [(t, b) if isinstance(t, torch.Tensor) else t
              for t, b in zip(current, batched, strict=True)]
    return levels, fronts
