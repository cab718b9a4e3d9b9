"""Records passed between the stages of the pipeline, shared by all of them.

The driver (:mod:`hod._build`) runs the stages in order: trace (:mod:`hod._tracing`),
split (:mod:`hod._split`), analyze (:mod:`hod._analysis`), plan (:mod:`hod._plan`),
derive (:mod:`hod._derive`), assemble (:mod:`hod._assemble`), passes
(:mod:`hod.passes`), codegen (:mod:`hod._codegen`) and compile (:mod:`hod._compiled`);
the api (:mod:`hod._api`) calls the driver. What one stage hands the next is defined here,
so a stage reads the records of earlier ones without importing those stages.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import TreeSpec

from ._emitter import Operand


class Mode(str, enum.Enum):
    """How the generated code differentiates (see :mod:`hod._build`)."""

    FORWARD = "forward"  # seed the inputs and push D^1 .. D^n through f
    REVERSE_LAST = "reverse-last"  # push D^1 .. D^(n-1) through f's traced gradient
    TAYLOR = "taylor"  # push univariate Taylor coefficients along directions through f
    ADJOINT = "adjoint"  # a scalar's Hessian summed from its curved nodes' local terms

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class Request:
    """What to build: ``f``, the orders wanted and how results nest."""

    f: Callable
    order: int
    argnums: int | tuple[int, ...]
    has_aux: bool
    with_values: bool  # derivatives(): (value, D1, ..., Dn) instead of Dn alone
    call: str
    memory_limit: int | None
    allow_random: bool = False  # keep random ops (dropout, torch.rand) in the graph
    compile: dict[str, Any] | None = None  # torch.compile keywords; None: eager code

    @property
    def orders(self) -> range:
        """The orders of the result: ``0..n`` for ``derivatives()``, else ``n`` alone."""
        return range(0 if self.with_values else self.order, self.order + 1)


@dataclass(frozen=True, kw_only=True, eq=False)
class TaylorPlan:
    """What a Taylor-mode build computes (see :mod:`hod._taylor`).

    The directions come either from the call, ``series=True``: its last positional
    argument holds, per differentiated leaf, a tuple of input coefficients ``s_1 .. s_j``
    of shape ``(R,) + leaf.shape``; or from ``basis(S)``, given the size ``S`` of the
    seed space (batch dims compressed when ``compress``): a ``(R, S)`` tensor of
    directions over it, or None for the identity (``R = S``). ``collapse``, when set,
    collapses the top coefficient over the directions; called with ``S`` it gives their
    weights ``(R,)`` (None: all one; a ``series`` plan's are all one unless
    ``call_weights``).
    ``returns`` lists the coefficient orders returned per output (0: the value); with
    ``gradient`` the Jacobian blocks follow (identity basis only). With ``reverse`` the
    jets run through ``f``'s traced gradient instead of ``f``.

    Chunks (see :mod:`hod._operators`): with ``chunked`` the code covers only ``c`` of the
    ``R`` directions of ``basis(S)`` on each call, named by an int64 ``(c,)`` tensor of
    row indices, the call's last positional argument (an index ``>= R`` is a zero
    direction, which pads a short chunk); the collapse weights are gathered the same way.
    With ``call_weights`` (a ``series`` plan) the collapse weights ``(R,)`` come from the
    call: its last positional argument, after the series.
    """

    order: int
    returns: tuple[int, ...]
    series: bool = False
    basis: Callable[[int], Any] | None = None
    compress: bool = True
    collapse: Callable[[int], Any] | None = None
    gradient: bool = False
    reverse: bool = False
    chunked: bool = False
    call_weights: bool = False

    @property
    def trailing(self) -> int:
        """How many positional arguments the code takes after ``f``'s: the series, the
        weights, the chunk's rows."""
        return int(self.series) + int(self.call_weights) + int(self.chunked)


@dataclass(frozen=True)
class ArgLayout:
    """How one differentiated positional argument flattens: its spec and leaf indices."""

    spec: TreeSpec
    leaves: tuple[int, ...]


@dataclass(frozen=True)
class FlatCall:
    """One call's arguments, flattened.

    ``tensors`` are the tensor leaves of ``(args, kwargs)`` in flatten order; ``diff``
    holds, for every differentiated leaf, its position in ``tensors``; ``layouts`` maps an
    argnum to its tree spec and the indices (into ``diff``) of its leaves.

    ``rows``, when set, is the number ``N`` of independent examples the call holds (a
    call made under ``torch.func.vmap``, see :mod:`hod._vmap`): every differentiated
    leaf and every output of ``f`` is ``(N,) + example shape``, and the results are
    each example's own derivatives, ``(N,) + block shape``.
    """

    tensors: tuple[torch.Tensor, ...]
    diff: tuple[int, ...]
    layouts: dict[int, ArgLayout]
    key: Hashable
    rebuild: Callable[[list[torch.Tensor]], tuple[tuple, dict]]
    rows: int | None = None


@dataclass
class Traced:
    """A traced flat function and the structure of what ``f`` returned: its graph's
    outputs are ``n_out`` differentiated outputs, then ``n_aux`` aux outputs."""

    gm: fx.GraphModule
    out_spec: TreeSpec
    aux_spec: TreeSpec | None
    n_out: int
    n_aux: int

    def outputs(self) -> list[fx.Node]:
        """The nodes the graph returns, in order."""
        return list(next(n for n in self.gm.graph.nodes if n.op == "output").args[0])


@dataclass(frozen=True)
class BuildState:
    """What every step of one build reads: the request, the flat call, ``f``'s traced
    graph and the values (meta tensors) of its differentiated outputs."""

    request: Request
    flat: FlatCall
    forward: Traced
    out_vals: list[torch.Tensor]


@dataclass(frozen=True)
class BlockKey:
    """Output leaf ``out`` differentiated w.r.t. input leaves ``leaves`` (in order)."""

    out: int
    leaves: tuple[int, ...]


#: A range ``[lo, hi)`` of the seed space.
Span = tuple[int, int]

#: The batch state of a node (see :mod:`hod._analysis`): the dim at which it is tracked,
#: FREE (no differentiable dependence on the batched inputs) or MIXED.
State = int | str | None
FREE = None
MIXED = "mixed"


@dataclass(frozen=True)
class Segment:
    """Where a differentiated input leaf sits in the seed space.

    An uncompressed leaf spans ``numel`` seeds. A leaf compressed along ``batch_dim`` (of
    size ``B``) spans one seed per within-slice coordinate: ``numel / B``.
    """

    offset: int
    shape: tuple[int, ...]
    batch_dim: int | None = None

    @property
    def sub_shape(self) -> tuple[int, ...]:
        """The leaf's shape without its batch dim (its full shape when uncompressed)."""
        if self.batch_dim is None:
            return self.shape
        return self.shape[: self.batch_dim] + self.shape[self.batch_dim + 1 :]

    @property
    def size(self) -> int:
        return math.prod(self.sub_shape)


@dataclass(frozen=True)
class Pieces:
    """A leaf whose gradient is a concatenation along dim 0 (a flat parameter vector split
    into a model's weights): the entries of each piece, in order."""

    leaf: int
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class SeedPlan:
    """The seed space: a segment per differentiated leaf and the states of the outputs.

    ``per_example`` lists the leaves whose gradient's per-example terms follow the
    gradients among the outputs, in that order (see :mod:`hod._per_example`). ``rows``:
    the call holds independent examples (:attr:`FlatCall.rows`), every leaf compressed
    along dim 0, and blocks are read per example instead of spread over the batch.
    ``lead_last``: a reverse-last block is read from the gradient of its leaf whose segment
    comes last, and each gradient needs the seeds up to its segment's end (else the first
    leads, needing the seeds from its segment on); ``pieces``: the leaves whose gradient
    the graph also returns in row blocks, after the gradients (see :mod:`hod._row_blocks`).
    """

    segments: tuple[Segment, ...]
    out_states: tuple[State, ...]
    per_example: tuple[int, ...] = ()
    rows: bool = False
    lead_last: bool = False
    pieces: tuple[Pieces, ...] = ()

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


@dataclass
class Jet:
    """A value and its derivatives ``derivs[k-1] = D^k value`` (``None`` when zero).

    ``span`` is the range of seeds the derivatives cover (None: the whole seed space);
    outside it they are zero, so ``D^k`` has shape ``(hi - lo,) * k + value.shape``.
    A jet widened to a larger span keeps its original in ``narrow``.
    """

    primal: fx.Node
    derivs: list[Operand]
    span: Span | None = None
    narrow: Jet | None = None

    def d(self, k: int) -> Operand:
        """``D^k`` of the value; ``D^0`` is the value itself."""
        return self.primal if k == 0 else self.derivs[k - 1]

    @property
    def is_constant(self) -> bool:
        return all(d is None for d in self.derivs)


@dataclass(frozen=True)
class Derived:
    """What derive hands assemble: the jets of the traced graph's outputs, derived in
    ``mode`` over ``seeds``; the values (meta tensors) of ``f``'s differentiated outputs;
    and the dtype of each differentiated input leaf."""

    mode: Mode
    seeds: SeedPlan
    out_jets: list[Jet]
    out_vals: list[torch.Tensor]
    leaf_dtypes: list[torch.dtype]
