"""API stage: the public transforms ``derivative``, ``derivatives``, ``jacobian``, ``hessian``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ._chunked import ChunkedFunction
from ._compiled import compile_options
from ._function import (
    DEFAULT_MEMORY_LIMIT,
    DerivativeFunction,
    check_memory_limit,
    describe,
    validate_arguments,
)
from ._records import Request
from ._shard import check_chunk_size, check_group
from ._sparse import LAYOUTS, ColouredDense, SparseFunction
from .errors import InputError, MemoryLimitError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _transform(
    name: str, f: Callable, *, order: int, argnums: int | tuple[int, ...], has_aux: bool,
    with_values: bool, shown_order: int | None, memory_limit: int | None, allow_random: bool,
    compile: bool | dict[str, Any], chunk_size: int | None, group: Any, sparse: bool = False,
    layout: torch.layout = torch.sparse_coo,
) -> Any:
    """The transformed ``f`` after checking the arguments; ``shown_order`` is the order
    named in error messages (None for ``jacobian``/``hessian``, whose name says it).
    With ``sparse`` it is a :class:`~hod._sparse.SparseFunction`, else with
    ``chunk_size`` or ``group`` a :class:`~hod._chunked.ChunkedFunction`."""
    call = describe(name, f, shown_order, argnums)
    nums = validate_arguments(call, f, order, argnums)
    check_chunk_size(call, chunk_size)
    check_group(call, group)
    _check_sparse(call, order, sparse, layout)
    check_memory_limit(call, memory_limit)
    request = Request(
        f=f, order=order, argnums=argnums, has_aux=has_aux, with_values=with_values, call=call,
        memory_limit=memory_limit, allow_random=allow_random,
        compile=compile_options(call, compile),
    )
    inner = f if order == 1 else DerivativeFunction(replace(request, order=order - 1), nums)

    def chunk_fits(args: tuple, kwargs: dict, chunk: int) -> bool:
        chunked = ChunkedFunction(request, nums, inner, DerivativeFunction(request, nums),
                                  chunk, None)
        try:
            chunked.lower(*args, **kwargs)
        except MemoryLimitError:
            return False
        return True

    coloured = None
    if order <= 2 and not with_values and request.compile is None:
        coloured = ColouredDense(request, nums, inner).runner
    whole = DerivativeFunction(request, nums, chunk_fits=chunk_fits, coloured=coloured)
    if chunk_size is None and group is None and not sparse:
        return whole
    if sparse:
        return SparseFunction(request, nums, inner, layout, chunk_size, group)
    return ChunkedFunction(request, nums, inner, whole, chunk_size, group)


def _check_sparse(call: str, order: int, sparse: Any, layout: Any) -> None:
    if not isinstance(sparse, bool):
        raise InputError(
            f"{call}: sparse must be True or False, got {sparse!r}.\n"
            f"  Fix: sparse=True for torch sparse results."
        )
    if sparse and order not in (1, 2):
        raise InputError(
            f"{call}: sparse=True computes Jacobians and Hessians (orders 1 and 2), not "
            f"order {order}.\n  Fix: use order 1 or 2, or drop sparse=True."
        )
    if layout not in LAYOUTS:
        raise InputError(
            f"{call}: layout must be torch.sparse_coo or torch.sparse_csr, got {layout!r}.\n"
            f"  Fix: e.g. layout=torch.sparse_csr for 2-D results."
        )
    if layout is not torch.sparse_coo and not sparse:
        raise InputError(
            f"{call}: layout= applies to sparse results only.\n"
            f"  Fix: pass sparse=True with it, or drop layout=."
        )


_COMMON_KEYWORDS = """

    ``memory_limit`` (bytes, default :data:`DEFAULT_MEMORY_LIMIT`, None for no limit)
    bounds every tensor the generated code allocates; a signature that would exceed it
    raises :class:`~hod.MemoryLimitError` when it is traced, before anything is computed.

    ``f`` must be deterministic: random ops (dropout in training mode, ``torch.rand``,
    ``bernoulli``) raise :class:`~hod.TracingError`. With ``allow_random=True`` they are
    kept: the draw happens inside the generated code, anew on every call, so each call
    differentiates a freshly drawn function (the random state advances as ``f``'s would,
    but the draws need not equal those of calling ``f`` itself).

    ``compile=True`` compiles each signature's generated code with ``torch.compile``
    (inductor by default; a dict gives its ``backend``, ``mode`` or ``options``). The first
    call of a signature then takes seconds to compile; later calls run fused kernels, much
    faster when the derivative tensors are many and small (orders 3 and 4). Calls under
    autograd, ``torch.func`` transforms or an enclosing ``torch.compile`` run the eager
    code (under ``vmap``, hod's batched code runs, compiled). A compiler failure raises
    :class:`~hod.CompileError`.

    ``chunk_size=c`` computes the derivative ``c`` seeds at a time (a seed is one entry of
    the differentiated arguments; the last derivative index runs over them): one body of
    generated code, forward mode over ``c`` seeds through hod's code for the order below,
    runs once per chunk, so intermediates are sized by ``c`` instead of the whole seed
    space; the result equals the unchunked one. ``group=`` (a ``torch.distributed``
    process group) splits the seeds across its ranks: each computes the rows of every
    differentiated leaf's first dim that a ``Shard`` of it holds (chunked by
    ``chunk_size`` when given) and gets a ``torch.distributed.tensor.DTensor`` per block,
    sharded along that dim (``full_tensor()`` gathers the whole block); the values of
    ``derivatives`` and blocks of 0-dim leaves are replicated. See :mod:`hod._chunked`.
"""

_SPARSE_KEYWORDS = """

    ``sparse=True`` (Jacobians and Hessians of one number): every block is a torch sparse
    tensor of the dense block's shape (``layout=torch.sparse_csr`` for 2-D blocks;
    COO by default). At the first call of a signature hod finds the derivative's
    index-level sparsity pattern in the traced graph, colours it, and generates code that
    pushes one direction per colour through ``f`` (through its gradient for a Hessian), so
    the work and memory scale with the colours and the nonzeros, not the dense size.
    ``.lower(...).sparsity`` shows the pattern and the colouring. With ``chunk_size`` the
    colours run that many at a time; with ``group`` each rank runs its share of them and
    every rank gets the whole sparse result. See :mod:`hod._sparse`.
"""


def _document(transform: Callable) -> Callable:
    transform.__doc__ += _COMMON_KEYWORDS
    if transform.__name__ != "derivatives":
        transform.__doc__ += _SPARSE_KEYWORDS
    return transform


@_document
def derivative(
    f: Callable, order: int, argnums: int | tuple[int, ...] = 0, *, has_aux: bool = False,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT, allow_random: bool = False,
    compile: bool | dict[str, Any] = False, chunk_size: int | None = None,
    group: ProcessGroup | None = None, sparse: bool = False,
    layout: torch.layout = torch.sparse_coo,
) -> DerivativeFunction | ChunkedFunction | SparseFunction:
    """The order-``order`` derivative of ``f`` with respect to ``args[argnums]``.

    Equal in structure and value to ``torch.func`` nesting: ``jacrev(f, argnums)`` wrapped
    in ``order - 1`` ``jacfwd(..., argnums)``. A leaf for output ``y`` and inputs
    ``x_i, x_j, ...`` has shape ``y.shape + x_i.shape + x_j.shape + ...``; a tuple
    ``argnums`` nests tuples ``order`` levels deep. With ``has_aux=True`` ``f`` returns
    ``(output, aux)`` and the result is ``(derivative, aux)``.
    """
    return _transform(
        "derivative", f, order=order, argnums=argnums, has_aux=has_aux, with_values=False,
        shown_order=order, memory_limit=memory_limit, allow_random=allow_random, compile=compile,
        chunk_size=chunk_size, group=group, sparse=sparse, layout=layout,
    )


@_document
def derivatives(
    f: Callable, order: int, argnums: int | tuple[int, ...] = 0, *,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT, allow_random: bool = False,
    compile: bool | dict[str, Any] = False, chunk_size: int | None = None,
    group: ProcessGroup | None = None,
) -> DerivativeFunction | ChunkedFunction:
    """``(value, D1, ..., Dn)`` of ``f`` from one generated function.

    ``Dk`` equals ``derivative(f, k, argnums)``; ``value`` is ``f``'s output.
    """
    return _transform(
        "derivatives", f, order=order, argnums=argnums, has_aux=False, with_values=True,
        shown_order=order, memory_limit=memory_limit, allow_random=allow_random, compile=compile,
        chunk_size=chunk_size, group=group,
    )


@_document
def jacobian(
    f: Callable, argnums: int | tuple[int, ...] = 0, *, has_aux: bool = False,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT, allow_random: bool = False,
    compile: bool | dict[str, Any] = False, chunk_size: int | None = None,
    group: ProcessGroup | None = None, sparse: bool = False,
    layout: torch.layout = torch.sparse_coo,
) -> DerivativeFunction | ChunkedFunction | SparseFunction:
    """``derivative(f, 1, argnums)``: equals ``torch.func.jacrev(f, argnums)``."""
    return _transform(
        "jacobian", f, order=1, argnums=argnums, has_aux=has_aux, with_values=False,
        shown_order=None, memory_limit=memory_limit, allow_random=allow_random, compile=compile,
        chunk_size=chunk_size, group=group, sparse=sparse, layout=layout,
    )


@_document
def hessian(
    f: Callable, argnums: int | tuple[int, ...] = 0, *, has_aux: bool = False,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT, allow_random: bool = False,
    compile: bool | dict[str, Any] = False, chunk_size: int | None = None,
    group: ProcessGroup | None = None, sparse: bool = False,
    layout: torch.layout = torch.sparse_coo,
) -> DerivativeFunction | ChunkedFunction | SparseFunction:
    """``derivative(f, 2, argnums)``: equals ``torch.func.hessian(f, argnums)``."""
    return _transform(
        "hessian", f, order=2, argnums=argnums, has_aux=has_aux, with_values=False,
        shown_order=None, memory_limit=memory_limit, allow_random=allow_random, compile=compile,
        chunk_size=chunk_size, group=group, sparse=sparse, layout=layout,
    )
