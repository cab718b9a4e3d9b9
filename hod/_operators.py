"""API stage: differential operators by Taylor mode, ``laplacian``, ``biharmonic``,
``operator``.

Each returns a callable with ``f``'s signature. Exact operators take their directions
from the seed space at trace time (:mod:`hod._directions`) and collapse the top
coefficient over them; stochastic ones draw random directions on every call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_map

from ._api import DEFAULT_MEMORY_LIMIT, describe, jacobian, validate_arguments
from ._build import Lowered
from ._directions import biharmonic_directions, operator_directions
from ._records import Request, TaylorPlan
from ._series import random_directions
from ._taylor import with_zero_row
from ._taylor_api import Chunks, TaylorFunction, differentiated_leaves, taylor_request
from .errors import InputError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

DISTRIBUTIONS = ("rademacher", "normal")


class OperatorFunction:
    """What :func:`laplacian`, :func:`biharmonic` and :func:`operator` return: call it
    like ``f``."""

    def __init__(self, call: str, run: Callable[..., Any],
                 lower: Callable[..., Lowered]) -> None:
        self._call, self._run, self._lower = call, run, lower

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        """The generated artifact for this call's signature (``.code``)."""
        return self._lower(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<hod {self._call}>"


def _check_sampling(call: str, samples: Any, distribution: Any, generator: Any,
                    allowed: tuple[str, ...]) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)
                                or samples < 1):
        raise InputError(
            f"{call}: samples must be a positive integer or None (exact), got {samples!r}.\n"
            f"  Fix: e.g. samples=16 for a 16-direction estimate, or drop it for the exact "
            f"operator."
        )
    if distribution not in allowed:
        raise InputError(
            f"{call}: distribution must be one of {allowed}, got {distribution!r}.\n"
            f"  Fix: e.g. distribution={allowed[0]!r}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(
            f"{call}: generator must be a torch.Generator or None, got "
            f"{type(generator).__name__}.\n  Fix: e.g. generator=torch.Generator().manual_seed(0)."
        )


def laplacian(
    f: Callable, argnums: int | tuple[int, ...] = 0, *, samples: int | None = None,
    distribution: str = "rademacher", generator: torch.Generator | None = None,
    weights: torch.Tensor | Callable[..., torch.Tensor] | None = None,
    value_and_grad: bool = False, memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
    compile: bool | dict[str, Any] = False, chunk_size: int | None = None,
    group: ProcessGroup | None = None,
) -> OperatorFunction:
    """The Laplacian ``sum_i d^2 f / dx_i^2`` over every entry of the differentiated
    argument(s), per output entry: called like ``f``, it returns a tree like ``f``'s output.

    **Exact** by default: collapsed Taylor mode, one first-order jet per input entry and
    one second-order coefficient summed over them. When rows of a batch stay independent
    through ``f`` (a network applied to a batch), hod compresses the batch at trace time:
    the result holds every row's own Laplacian at the cost of one row's directions.

    ``samples=S``: the unbiased Hutchinson estimate from ``S`` random directions,
    Rademacher (default) or ``distribution="normal"``, drawn anew on each call (from
    ``generator`` when given: reproducible). Under ``torch.func.vmap`` pass
    ``randomness="same"`` or ``"different"`` to it.

    ``weights=C``: ``sum_ij C_ij d^2 f / dx_i dx_j`` (Fokker-Planck, Black-Scholes), with
    ``C`` a ``(D, D)`` tensor over the ``D`` differentiated entries (flattened, arguments
    in positional order) or a function of ``f``'s arguments returning one. It takes
    ``2 D`` directions, ``e_r +- C[:, r]``, built on each call (differentiable in ``C``).

    ``value_and_grad=True`` returns ``(u, grad, lap)``, ``grad`` like
    ``hod.jacobian(f, argnums)``: from the same pass when exact and uncut; the
    stochastic, weighted and cut forms compute it with ``hod.jacobian`` (given the same
    ``chunk_size`` and ``group``).

    ``chunk_size=c`` runs the directions (the entries, the samples, the ``2 D`` weighted
    ones) ``c`` at a time through one generated code and sums the parts; ``group=``
    gives each rank of a ``torch.distributed`` process group a slice of them and returns
    ``Partial`` DTensors (``u``: ``Replicate``). See "Chunks and ranks" in the Taylor
    docs.
    """
    call = describe("laplacian", f, None, argnums)
    nums = validate_arguments(call, f, 2, argnums)
    _check_sampling(call, samples, distribution, generator, DISTRIBUTIONS)
    chunks = Chunks(call, chunk_size, group)
    series = samples is not None or weights is not None
    request = taylor_request(call, f, 2, argnums, memory_limit, compile)
    if value_and_grad and not series and not chunks.active:
        plan = TaylorPlan(order=2, returns=(0, 2), collapse=lambda size: None, gradient=True)
        inner = TaylorFunction(request, nums, plan)
        return OperatorFunction(call, lambda *a, **k: _value_grad_lap(inner(*a, **k)),
                                inner.lower)
    run, lower = _laplacian_parts(call, nums, request, (samples, distribution, generator),
                                  weights, chunks)
    if value_and_grad:
        gradient = jacobian(f, argnums, memory_limit=memory_limit, chunk_size=chunk_size,
                            group=group)
        return OperatorFunction(
            call, lambda *a, **k: (chunks.replicate(f(*a, **k)), gradient(*a, **k),
                                   run(*a, **k)), lower
        )
    return OperatorFunction(call, run, lower)


def _laplacian_parts(
    call: str, nums: tuple[int, ...], request: Request,
    sampling: tuple[int | None, str, torch.Generator | None],
    weights: torch.Tensor | Callable[..., torch.Tensor] | None, chunks: Chunks,
) -> tuple[Callable[..., Any], Callable[..., Lowered]]:
    """Run and lower of the stochastic, weighted or exact Laplacian."""
    samples = sampling[0]
    if samples is not None and weights is not None:
        raise InputError(
            f"{call}: samples= and weights= cannot be combined.\n"
            f"  Fix: drop samples for the exact weighted operator."
        )
    if samples is not None:
        return _sampled(call, nums, request, 2, sampling, 1 / samples, chunks)
    if weights is not None:
        return _weighted(call, nums, request, weights, chunks)
    plan = TaylorPlan(order=2, returns=(2,), collapse=lambda size: None, chunked=chunks.active)
    inner = TaylorFunction(request, nums, plan)
    exact = _basis_operator(call, inner, nums, chunks, lambda size: size,
                            lambda args, result, rows: result[0])
    return exact, exact.lower


def _value_grad_lap(result: tuple) -> tuple:
    value, lap, grad = result
    return value, grad, lap


def _weighted(call: str, nums: tuple[int, ...], request: Request,
              weights: torch.Tensor | Callable[..., torch.Tensor],
              chunks: Chunks) -> tuple[Callable[..., Any], Callable[..., Lowered]]:
    """Run and lower of ``sum_ij C_ij d^2 f/dx_i dx_j``: ``H[e_r, c_r]`` summed over the
    columns ``c_r`` of ``C``, each ``(c_2(e_r + c_r) - c_2(e_r - c_r)) / 4``; the code
    takes the directions and these weights from the call."""
    plan = TaylorPlan(order=2, returns=(2,), series=True, collapse=lambda size: None,
                      call_weights=True)
    inner = TaylorFunction(request, nums, plan)

    def count(args: tuple, kwargs: dict) -> int:
        return 2 * sum(leaf.numel() for leaf in differentiated_leaves(call, args, nums))

    def series(args: tuple, kwargs: dict) -> tuple:
        leaves = differentiated_leaves(call, args, nums)
        c = _checked_weights(call, leaves, weights(*args, **kwargs) if callable(weights)
                             else weights)
        eye = torch.eye(len(c), dtype=c.dtype, device=c.device)
        directions = torch.cat([eye + c.mT, eye - c.mT])
        out, offset = [], 0
        for leaf in leaves:
            part = directions[:, offset:offset + leaf.numel()]
            out.append((part.reshape(len(directions), *leaf.shape).contiguous(),))
            offset += leaf.numel()
        quarter = torch.full((len(c),), 0.25, dtype=c.dtype, device=c.device)
        return tuple(out), torch.cat([quarter, -quarter])

    def chunk(args: tuple, kwargs: dict, directions: tuple, piece: range) -> Any:
        total = len(directions[1])
        return inner(*args, *chunks.cut(directions, piece, total), **kwargs)[0]

    return _series_operator(inner, chunks, count, series, chunk)


def _checked_weights(call: str, leaves: list[torch.Tensor], c: Any) -> torch.Tensor:
    """``C`` checked as ``(D, D)`` over the ``D`` differentiated entries, like them."""
    size = sum(leaf.numel() for leaf in leaves)
    if not isinstance(c, torch.Tensor) or tuple(c.shape) != (size, size):
        got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
        raise InputError(
            f"{call}: weights must be a ({size}, {size}) tensor over the {size} "
            f"differentiated entries, got {got}.\n"
            f"  Fix: pass C with one row and column per entry (arguments flattened in "
            f"positional order), or a function of f's arguments returning one."
        )
    return c.to(leaves[0])


def biharmonic(
    f: Callable, argnums: int | tuple[int, ...] = 0, *, samples: int | None = None,
    distribution: str = "normal", generator: torch.Generator | None = None,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT, compile: bool | dict[str, Any] = False,
    chunk_size: int | None = None, group: ProcessGroup | None = None,
) -> OperatorFunction:
    """The biharmonic ``sum_ij d^4 f / dx_i^2 dx_j^2`` over every entry of the
    differentiated argument(s), per output entry: called like ``f``.

    **Exact** by default, from collapsed fourth-order jets along ``D^2`` directions (the
    ``D`` unit vectors and ``e_i +- e_j``, weights chosen at trace time; batches
    compressed as in :func:`laplacian`). ``samples=S``: the unbiased estimate
    ``E[c_4(v)] / 3`` over standard normal ``v`` (Rademacher directions would be biased
    for this operator, so only ``distribution="normal"`` is accepted). ``chunk_size``
    and ``group`` cut the directions as in :func:`laplacian`.
    """
    call = describe("biharmonic", f, None, argnums)
    nums = validate_arguments(call, f, 4, argnums)
    _check_sampling(call, samples, distribution, generator, ("normal",))
    chunks = Chunks(call, chunk_size, group)
    request = taylor_request(call, f, 4, argnums, memory_limit, compile)
    if samples is not None:
        run, lower = _sampled(call, nums, request, 4, (samples, distribution, generator),
                              1 / (3 * samples), chunks)
        return OperatorFunction(call, run, lower)
    directions = functools.lru_cache(maxsize=8)(biharmonic_directions)
    plan = TaylorPlan(order=4, returns=(4,), basis=lambda size: directions(size)[0],
                      collapse=lambda size: directions(size)[1], chunked=chunks.active)
    inner = TaylorFunction(request, nums, plan)
    return _basis_operator(call, inner, nums, chunks, lambda size: size * size,
                           lambda args, result, rows: result[0])


def operator(
    f: Callable, terms: Mapping[tuple[int, ...], float], argnums: int | tuple[int, ...] = 0,
    *, memory_limit: int | None = DEFAULT_MEMORY_LIMIT, compile: bool | dict[str, Any] = False,
    chunk_size: int | None = None, group: ProcessGroup | None = None,
) -> OperatorFunction:
    """The linear differential operator ``sum_a c_a d^a f``, per output entry: called
    like ``f``.

    ``terms`` maps multi-indices to numbers. A multi-index is a tuple of flat positions
    in the differentiated entries (arguments flattened in positional order), with
    repeats, of order 1 to 4: ``{(0, 0): 1.0, (1,): -2.0}`` is ``u_xx - 2 u_t`` for
    ``x = args[0][0]``, ``t = args[0][1]``. hod computes it from univariate jets of the
    highest order present, along directions chosen at trace time (each mixed partial
    interpolated from the fewest integer directions over its positions), collapsing the
    top coefficient; lower orders are weighted per direction. ``chunk_size`` and
    ``group`` cut the directions as in :func:`laplacian`.
    """
    call = describe("operator", f, None, argnums)
    nums = validate_arguments(call, f, 1, argnums)
    terms = _checked_terms(call, terms)
    chunks = Chunks(call, chunk_size, group)
    order = max(len(index) for index in terms)
    request = taylor_request(call, f, order, argnums, memory_limit, compile)

    @functools.lru_cache(maxsize=8)
    def directions(size: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        largest = max(max(index) for index in terms)
        if largest >= size:
            raise InputError(
                f"{call}: a multi-index names position {largest}, but the differentiated "
                f"arguments have {size} entries (positions 0..{size - 1}).\n"
                f"  Fix: count positions over the flattened differentiated entries."
            )
        return operator_directions(terms, size)

    lower_orders = sorted({len(index) for index in terms} - {order})
    plan = TaylorPlan(order=order, returns=(*lower_orders, order), compress=False,
                      basis=lambda size: directions(size)[0],
                      collapse=lambda size: directions(size)[1][order], chunked=chunks.active)
    inner = TaylorFunction(request, nums, plan)

    def finish(args: tuple, result: tuple, rows: torch.Tensor | None) -> Any:
        """The top plus each lower order's coefficients weighted per direction (the
        chunk's ``rows`` of the weights; an index past the last is a zero direction)."""
        *lower, top = result
        size = sum(leaf.numel() for leaf in differentiated_leaves(call, args, nums))
        for k, coefficients in zip(lower_orders, lower, strict=True):
            weights = directions(size)[1][k]
            if rows is not None:
                weights = with_zero_row(weights)[rows.cpu()]
            top = tree_map(functools.partial(_add_weighted, weights), top, coefficients)
        return top

    return _basis_operator(call, inner, nums, chunks,
                           lambda size: len(directions(size)[0]), finish)


def _sampled(call: str, nums: tuple[int, ...], request: Request, order: int,
             sampling: tuple[int, str, torch.Generator | None], scale: float,
             chunks: Chunks) -> tuple[Callable[..., Any], Callable[..., Lowered]]:
    """Run and lower of a stochastic operator: ``scale`` times the collapsed top
    coefficient along ``samples`` random directions drawn anew on every call (all of
    them on every rank, which keeps its own slice)."""
    samples, distribution, generator = sampling
    plan = TaylorPlan(order=order, returns=(order,), series=True, collapse=lambda size: None)
    inner = TaylorFunction(request, nums, plan)

    def series(args: tuple, kwargs: dict) -> tuple:
        leaves = differentiated_leaves(call, args, nums)
        return (random_directions(call, leaves, samples, distribution, generator),)

    def chunk(args: tuple, kwargs: dict, directions: tuple, piece: range) -> Any:
        (top,) = inner(*args, *chunks.cut(directions, piece, samples), **kwargs)
        return tree_map(lambda t: t * scale, top)

    return _series_operator(inner, chunks, lambda a, k: samples, series, chunk)


def _series_operator(
    inner: TaylorFunction, chunks: Chunks, count: Callable[[tuple, dict], int],
    series: Callable[[tuple, dict], Any], chunk: Callable[[tuple, dict, Any, range], Any],
) -> tuple[Callable[..., Any], Callable[..., Lowered]]:
    """Run and lower of an operator whose ``count(args, kwargs)`` directions come with
    the call: ``series(args, kwargs)`` gives the code's own arguments (the series, and
    weights), ``chunk(args, kwargs, series, piece)`` one chunk's part of the sum."""
    def run(*args: Any, **kwargs: Any) -> Any:
        directions, total = series(args, kwargs), count(args, kwargs)
        return chunks.partial(chunks.summed(
            total, lambda piece: chunk(args, kwargs, directions, piece)))

    def lower(*args: Any, **kwargs: Any) -> Lowered:
        total = count(args, kwargs)
        first = next(iter(chunks.pieces(total)))
        return inner.lower(*args, *chunks.cut(series(args, kwargs), first, total), **kwargs)

    return run, lower


def _basis_operator(
    call: str, inner: TaylorFunction, nums: tuple[int, ...], chunks: Chunks,
    bound: Callable[[int], int], finish: Callable[[tuple, tuple, torch.Tensor | None], Any],
) -> OperatorFunction:
    """An operator whose directions are fixed at trace time: its whole code when the
    call cuts nothing, else the chunked code (``TaylorPlan.chunked``) run over this
    rank's chunks. ``bound(D)`` is at least the number ``R`` of directions for ``D``
    differentiated entries; ``finish(args, result, rows)`` is a chunk's part of the sum
    from the code's result (rows None: all directions)."""
    if not chunks.active:
        return OperatorFunction(call, lambda *a, **k: finish(a, inner(*a, **k), None),
                                inner.lower)

    def total(args: tuple, kwargs: dict) -> tuple[int, torch.device]:
        """``R``, as the code records it (batch compression may make it below the
        bound), and the device of the rows."""
        leaves = differentiated_leaves(call, args, nums)
        probe = chunks.rows(range(0), bound(sum(leaf.numel() for leaf in leaves)),
                            leaves[0].device)
        return inner.lower(*args, probe, **kwargs).seed_size, leaves[0].device

    def run(*args: Any, **kwargs: Any) -> Any:
        directions, device = total(args, kwargs)

        def chunk(piece: range) -> Any:
            rows = chunks.rows(piece, directions, device)
            return finish(args, inner(*args, rows, **kwargs), rows)

        return chunks.partial(chunks.summed(directions, chunk))

    def lower(*args: Any, **kwargs: Any) -> Lowered:
        directions, device = total(args, kwargs)
        return inner.lower(*args, chunks.rows(range(0), directions, device), **kwargs)

    return OperatorFunction(call, run, lower)


def _add_weighted(weights: torch.Tensor, total: torch.Tensor, coefficients: torch.Tensor):
    """``total + sum_r weights[r] coefficients[r]``."""
    return total + torch.tensordot(weights.to(coefficients), coefficients, dims=1)


def _checked_terms(call: str, terms: Any) -> dict[tuple[int, ...], float]:
    """``terms`` as ``{sorted multi-index: float}``, or a clear error."""
    if not isinstance(terms, Mapping) or not terms:
        raise InputError(
            f"{call}: terms must be a non-empty dict of multi-indices to numbers, got "
            f"{terms!r}.\n  Fix: e.g. {{(0, 0): 1.0, (1,): -2.0}} for u_xx - 2 u_t."
        )
    checked: dict[tuple[int, ...], float] = {}
    for index, coefficient in terms.items():
        index = (index,) if isinstance(index, int) else index
        if (not isinstance(index, tuple) or not 1 <= len(index) <= 4
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in index)):
            raise InputError(
                f"{call}: each multi-index must be a tuple of 1 to 4 non-negative flat "
                f"positions, got {index!r}.\n"
                f"  Fix: e.g. (0, 0) for d^2/dx_0^2; orders above 4 are not supported."
            )
        if not isinstance(coefficient, (int, float)) or isinstance(coefficient, bool):
            raise InputError(
                f"{call}: the coefficient of {index!r} must be a number, got "
                f"{type(coefficient).__name__}.\n  Fix: e.g. {{(0, 0): 1.0}}."
            )
        key = tuple(sorted(index))
        checked[key] = checked.get(key, 0.0) + float(coefficient)
    return checked
