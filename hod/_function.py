"""API stage: what every derivative transform returns, a function with a cache of generated
code per call signature (:class:`DerivativeFunction`), and the checks of the arguments all
transforms share."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import replace
from types import CellType
from typing import Any

import torch

from ._build import Lowered, build
from ._records import FlatCall, Request
from ._shard import chunk_estimate, with_chunk_hint
from ._signature import call_signature, flatten_call
from ._vmap import Examples, examples_of
from .errors import HodError, InputError, MemoryLimitError
from .passes.memory import unwatched

#: Default ``memory_limit``: no single tensor the generated code allocates may exceed it.
DEFAULT_MEMORY_LIMIT = 8 * 2**30

#: How many signatures one transformed function keeps generated code for.
CACHE_SIZE = 64


#: ``fits(args, kwargs, chunk)``: whether the transform's code, chunked so, builds within
#: its memory limit for this call.
ChunkFits = Callable[[tuple, dict, int], bool]

#: ``runner(flat, seeds)``: what computes the result of the call ``flat`` from the colours of
#: its sparsity pattern, when that beats code pushing ``seeds`` tangents; else None.
Coloured = Callable[[FlatCall, int], Callable[[tuple, dict, tuple], object] | None]

#: Where ``f`` reads a tensor by name (a globals dict or a closure cell), and the tensor.
_Binding = tuple[dict | CellType, str, torch.Tensor]


class DerivativeFunction:
    """What the transforms return: call it like ``f``; ``lower`` shows the generated code.

    **Cache.** Code is generated on the first call with a new signature (pytree structure,
    shapes, dtypes, devices, and the values of non-tensor arguments, compared with ``==``,
    or by identity when unhashable) and reused afterwards; at most :data:`CACHE_SIZE`
    signatures are kept, least recently used first out. Calls from several threads are
    safe; code generation itself runs one at a time.

    **Captured tensors.** Tensors ``f`` reads from its closure, globals or a module
    (parameters of a model it calls) are not arguments: the generated code holds a
    *reference* to each, so in-place updates (``W.mul_(2)``, ``optimizer.step()``,
    ``load_state_dict``) show in the next call's result. *Rebinding* a name to a new
    tensor (``W = W * 2``) is seen when ``f`` itself names it (a global or closure
    variable of ``f``): hod then drops its generated code and retraces. A rebinding that
    ``f`` reaches only indirectly (an attribute of a module, a global of a helper ``f``
    calls) is not seen: pass such tensors as arguments, or call :meth:`clear_cache`.
    Gradients flow into captured tensors that require them (``.backward()`` reaches a
    captured model's parameters). Inside ``torch.func.grad``/``vmap``, a tensor that the
    transform tracks must be an argument of ``f``, not captured: that raises
    :class:`~hod.TracingError`.

    **Under vmap.** Called under ``torch.func.vmap``, it runs code generated for the
    batched signature, every example's derivatives at once (see :mod:`hod._vmap`).
    """

    def __init__(self, request: Request, argnums: tuple[int, ...], *,
                 chunk_fits: ChunkFits | None = None, coloured: Coloured | None = None) -> None:
        self._request = request
        self._chunk_fits = chunk_fits  # set: a MemoryLimitError suggests a chunk_size
        self._coloured = coloured  # set: a sparse pattern may be computed by colours
        self._argnums = argnums
        self._cache: OrderedDict[Any, Lowered] = OrderedDict()
        self._lock = threading.Lock()
        self._bindings: list[_Binding] = []
        functools.update_wrapper(self, request.f, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        examples = self._examples(args, kwargs)
        if examples is not None:
            tensors, key = call_signature(examples.args, examples.kwargs)
            lowered = self._cached((examples.key, key)) or self._lowered(
                examples.args, examples.kwargs, examples
            )
            if lowered is not UNBATCHED:
                with examples.below():
                    results = lowered.results(tensors)
                return examples.wrap(results)
        tensors, key = call_signature(args, kwargs)
        lowered = self._cached(key) or self._lowered(args, kwargs)
        if lowered.coloured is not None and unwatched(tensors):
            return lowered.coloured(args, kwargs, tensors)
        return lowered.results(tensors)

    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        """The generated artifact for this call's signature (``.code``, ``.graph_module``).

        Under ``torch.func.vmap`` it is the batched code (see :mod:`hod._vmap`), whose
        ``examples`` says how many examples it takes, or the unbatched code that
        functorch batches where that cannot be built.
        """
        examples = self._examples(args, kwargs)
        if examples is not None:
            lowered = self._lowered(examples.args, examples.kwargs, examples)
            if lowered is not UNBATCHED:
                return lowered
        return self._lowered(args, kwargs)

    def clear_cache(self) -> None:
        """Forget all generated code: the next call traces ``f`` again."""
        with self._lock:
            self._cache.clear()

    def _examples(self, args: tuple, kwargs: dict) -> Examples | None:
        """The call's examples when it is made under vmap (see :mod:`hod._vmap`)."""
        return examples_of(args, kwargs, lambda a: a in self._argnums)

    def _flatten(self, args: tuple, kwargs: dict) -> FlatCall:
        call = self._request.call
        for a in self._argnums:
            if a >= len(args):
                raise InputError(
                    f"{call}: argnums asks for positional argument {a}, but the call passed "
                    f"{len(args)} positional argument(s).\n"
                    f"  Fix: pass that argument positionally, or change argnums."
                )
        return flatten_call(args, kwargs, self._argnums, call)

    # torch.compile must not trace code generation itself; it compiles what this returns.
    @torch.compiler.disable
    def _lowered(self, args: tuple, kwargs: dict, examples: Examples | None = None) -> Any:
        """The code for this call's signature; with ``examples``, ``args`` and ``kwargs``
        are theirs, and the code is their batched code, or :data:`UNBATCHED` when that
        cannot be built."""
        flat = self._flatten(args, kwargs)
        request = self._request
        if examples is not None:
            flat = replace(flat, rows=examples.n, key=(examples.key, flat.key))
            request = replace(request, f=examples.vmapped(request.f))
        lowered = self._cached(flat.key)
        if lowered is None:
            # make_fx keeps global tracer state, so code generation is serialised;
            # reentrant because f may call a hod function that is traced for the first time.
            with _BUILD_LOCK:
                lowered = self._cached(flat.key)  # another thread may have just built it
                if lowered is None:
                    lowered = self._build_or_unbatched(request, flat, examples)
                    self._store(flat.key, lowered, _tensor_bindings(self._request.f))
        return lowered

    def _build_or_unbatched(
        self, request: Request, flat: FlatCall, examples: Examples | None
    ) -> Any:
        try:
            lowered = self._build(request, flat)
        except MemoryLimitError as error:
            # (the unbatched code under vmap would need as much memory)
            raise self._hinted(error, flat) from None
        except (HodError, RuntimeError, NotImplementedError):
            if examples is None:
                raise
            # functorch batches the unbatched code instead; a genuine error of f is
            # raised there again, in terms of one example.
            return UNBATCHED
        if examples is None and self._coloured is not None:
            runner = self._coloured(flat, lowered.seed_size)
            if runner is not None:
                lowered = replace(lowered, coloured=runner)
        return lowered

    def _build(self, request: Request, flat: FlatCall) -> Lowered:
        return build(request, flat)

    def _hinted(self, error: MemoryLimitError, flat: FlatCall) -> MemoryLimitError:
        """``error`` suggesting a ``chunk_size`` that was seen to fit: from the estimate
        (:func:`~hod._shard.chunk_estimate`) down by halves, the first whose chunked code
        builds under the limit; ``error`` itself when none does."""
        seeds = sum(flat.tensors[pos].numel() for pos in flat.diff)
        chunk = chunk_estimate(error, seeds)
        if self._chunk_fits is None or flat.rows is not None or chunk is None:
            return error
        args, kwargs = flat.rebuild(list(flat.tensors))
        while chunk >= 1:
            if self._chunk_fits(args, kwargs, chunk):
                return with_chunk_hint(error, seeds, chunk)
            chunk //= 2
        return error

    def _cached(self, key: Hashable) -> Lowered | None:
        if self._bindings and any(
            _read(scope, name) is not t for scope, name, t in self._bindings
        ):
            self.clear_cache()  # f names a rebound tensor: all its code is stale
        lowered = self._cache.get(key)
        if lowered is not None:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
        return lowered

    def _store(self, key: Hashable, lowered: Lowered, bindings: list[_Binding]) -> None:
        with self._lock:
            self._bindings = bindings
            self._cache[key] = lowered
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)

    def __repr__(self) -> str:
        return f"<hod {self._request.call}>"


_BUILD_LOCK = threading.RLock()

#: Cached for a call under vmap whose batched code cannot be built: functorch batches
#: the unbatched code instead.
UNBATCHED = object()
_MISSING = object()


def _tensor_bindings(f: Callable) -> list[_Binding]:
    """The tensors ``f``'s own code names through a closure cell or a global."""
    func = getattr(f, "__func__", f)  # a bound method's function
    code = getattr(func, "__code__", None)
    if code is None:
        return []
    cells = func.__closure__ or ()
    scopes = [(cell, name) for name, cell in zip(code.co_freevars, cells, strict=True)]
    scopes += [(func.__globals__, name) for name in code.co_names]
    bindings = []
    for scope, name in scopes:
        value = _read(scope, name)
        if isinstance(value, torch.Tensor):
            bindings.append((scope, name, value))
    return bindings


def _read(scope: dict | CellType, name: str) -> object:
    if isinstance(scope, dict):
        return scope.get(name, _MISSING)
    try:
        return scope.cell_contents
    except ValueError:  # an empty cell
        return _MISSING


def describe(name: str, f: Callable, order: int | None, argnums: Any) -> str:
    fname = getattr(f, "__name__", type(f).__name__)
    parts = [fname] + ([f"order={order!r}"] if order is not None else [])
    if argnums != 0:
        parts.append(f"argnums={argnums!r}")
    return f"hod.{name}({', '.join(parts)})"


def validate_arguments(call: str, f: Any, order: Any, argnums: Any) -> tuple[int, ...]:
    if not callable(f):
        raise InputError(
            f"{call}: the first argument must be a callable, got {type(f).__name__}.\n"
            f"  Fix: pass the function to differentiate, e.g. hod.derivative(loss, order=2)."
        )
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise InputError(
            f"{call}: order must be a positive integer, got {order!r}.\n"
            f"  Fix: use order=1 for the Jacobian, order=2 for the Hessian, and so on."
        )
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    if not nums or any(isinstance(a, bool) or not isinstance(a, int) for a in nums):
        raise InputError(
            f"{call}: argnums must be an int or a non-empty tuple of ints, got {argnums!r}.\n"
            f"  Fix: e.g. argnums=0 or argnums=(0, 1)."
        )
    if any(a < 0 for a in nums):
        raise InputError(
            f"{call}: argnums must be non-negative, got {argnums!r}.\n"
            f"  Fix: count positional arguments from 0."
        )
    if len(set(nums)) != len(nums):
        raise InputError(
            f"{call}: argnums {argnums!r} names an argument twice.\n"
            f"  Fix: list each argument once."
        )
    return nums


def check_memory_limit(call: str, memory_limit: Any) -> None:
    """Refuse a ``memory_limit`` that is not None or a positive number of bytes."""
    if memory_limit is not None and (
        isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit <= 0
    ):
        raise InputError(
            f"{call}: memory_limit must be a positive number of bytes or None, "
            f"got {memory_limit!r}.\n  Fix: e.g. memory_limit=16 * 2**30 for 16 GiB."
        )
