"""Matrix products: bilinear, so Leibniz with ``matmul`` broadcasting the seed axes."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import fx

from .._combinatorics import subsets
from .._emitter import Emitter, Operand, delta_strides
from .._jet import DeriveContext
from .._records import Jet
from ..errors import UnsupportedOperatorError
from ._registry import register
from .elementwise import as_jet

aten = torch.ops.aten


#: Below this many broadcast products, ``matmul``'s lower call overhead wins.
EINSUM_MIN_PRODUCTS = 256
#: Stacked matrices times a plain one, or the reverse: ``matmul``'s batched products are
#: as fast as one large product from this many multiply-adds per product on (measured on
#: CPU: 4x slower at 1000, even at 4000-8000, 1.6x faster at 25000), copy nothing, and
#: have an ``out=`` form, so planned memory takes their results (``einsum`` allocates).
EINSUM_MAX_PRODUCT_MACS = 4096
#: A plain matrix times contiguous stacked matrices of at least this many entries each:
#: ``einsum`` would copy the stack into a layout it can fold, ``matmul`` multiplies them
#: where they lie (measured on CPU, 1000 stacked 48 x 16 matrices: 3-5x faster).
STACKED_MIN_ENTRIES = 512
#: Products with a plain matrix this narrow, over this many rows, take the block-diagonal
#: forms (:func:`_narrow_product`, :func:`_narrow_left`) on the CPU, where they were
#: measured; other devices keep the plain forms.
NARROW_MAX_COLUMNS = 8
NARROW_MIN_ROWS = 2048


def _matmul(ctx: DeriveContext):
    """``a @ b`` over broadcast leading axes.

    ``matmul`` expands operands whose leading axes broadcast against each other (a
    Leibniz cross term ``D a[s1] @ D b[s2]``, or a matrix times a derivative with several
    seed axes) and then runs one tiny product per pair of seeds; ``einsum`` folds the axes
    into one large product instead (10-30x faster at about 130 seeds). With few products,
    or when ``matmul`` can fold the leading axes itself, ``matmul`` is kept: it costs a
    few microseconds less per call.
    """

    def apply(a: fx.Node, b: fx.Node) -> fx.Node:
        em = ctx.em
        placed = _identity_product(em, a, b) or _broadcast_rows(em, a, b)
        if placed is not None:
            return placed
        narrow = _narrow_product(em, a, b) or _narrow_left(em, a, b)
        if narrow is not None:
            return narrow
        if _needs_einsum(em, a, b):
            return _transposed_stack(em, a, b) or em.call(
                aten.einsum.default, "...ik,...kj->...ij", [a, b]
            )
        return em.call(aten.matmul.default, a, b)

    return apply


def _transposed_stack(em: Emitter, a: fx.Node, b: fx.Node) -> fx.Node | None:
    """A plain ``a (m, k)`` times stacked ``b (..., k, n)`` that is the transpose of a
    contiguous tensor (a weight's seeds, transposed in a linear layer): ``b^T a^T`` is then
    one product of all of ``b``'s rows, and the result its transpose, a view. ``einsum``
    would copy ``b`` into another layout first (2.4 ms a step for a GRU's 1,073 seeds)."""
    if em.rank(a) != 2 or em.rank(b) < 3 or not b.meta["val"].mT.is_contiguous():
        return None
    k, n = em.shape(b)[-2:]
    rows = em.reshape(em.call(aten.transpose.int, b, -1, -2), [-1, k])
    product = em.call(aten.mm.default, rows, em.permute(a, [1, 0]))
    product = em.reshape(product, [*em.shape(b)[:-2], n, em.shape(a)[0]])
    return em.call(aten.transpose.int, product, -1, -2)


def _broadcast_rows(em: Emitter, a: fx.Node, b: fx.Node) -> fx.Node | None:
    """``a @ b`` for a plain matrix ``b`` and an ``a`` expanded along dims other than its
    last: the product of what was expanded, expanded the same way (a seed compressed over
    a batch repeats one row's seeds for every row; the product need not repeat them)."""
    if not (isinstance(a, fx.Node) and a.target is aten.expand.default and em.rank(b) == 2):
        return None
    base = a.args[0]
    if em.rank(base) != em.rank(a) or em.shape(base)[-1] != em.shape(a)[-1]:
        return None
    product = em.call(aten.matmul.default, base, b)
    return em.expand(product, [*em.shape(a)[:-1], em.shape(b)[-1]])


def _identity_product(em: Emitter, a: fx.Node, b: fx.Node) -> fx.Node | None:
    """``a @ b`` when one side is a matrix leaf's identity seed and the other a matrix,
    or matrices stacked along the other leading axes.

    With ``b[s, k, n] = (s == index of (k, n))``, ``(a @ b)[s(k, n), m, n'] = a[m, k]``
    when ``n == n'`` and zero otherwise: ``a`` placed on a diagonal, with no product (the
    dense product costs ``S`` times more and reads an ``S x S`` identity).
    Likewise ``(a @ b)[s(m, k), m', n] = b[k, n]`` when ``m == m'`` for an identity ``a``.
    The seed axis may stand among leading axes of size 1 (a Leibniz cross term, where
    ``a`` carries seed axes of its own there); the result has it in the same place.
    Returns None when neither case applies.
    """
    for seed, other, seed_is_left in ((b, a, False), (a, b, True)):
        strides = _matrix_delta(em, seed, seed_is_left)
        if strides is None or em.rank(other) > em.rank(seed):
            continue
        lead_shape = em.shape(seed)[:-2]
        shape = (1,) * (em.rank(seed) - em.rank(other)) + em.shape(other)  # right-aligned
        axis = next((i for i, d in enumerate(lead_shape) if d != 1), None)
        rows, cols = em.shape(seed)[-2:]
        if axis is None or shape[axis] != 1:
            continue
        if sorted(strides) != [1, cols if strides[0] > strides[1] else rows]:
            continue
        rows_first = strides[0] > strides[1]  # seeds run over (row, col) or (col, row)
        lead = [d for i, d in enumerate(shape[:-2]) if i != axis]
        q = len(lead)
        if seed_is_left and rows == 1:  # a vector's seeds as a row: (a @ b)[s(k), 0] = b[k]
            placed = em.reshape(other, [*lead, cols, 1, shape[-1]])
        elif seed_is_left:  # (seed rows, k) @ b (k, n): b[k, n] placed at (row, row')
            k, n = shape[-2:]
            spread = em.expand(em.reshape(other, [*lead, k, n, 1]), [*lead, k, n, rows])
            dims = (q, q + 2) if rows_first else (q + 1, q + 2)
            placed = em.call(aten.diag_embed.default, spread, 0, *dims)
            placed = em.reshape(placed, [*lead, rows * cols, rows, n])
        else:  # a (m, k) @ (k = seed rows, seed cols): a[m, k] at (col, col')
            m = shape[-2]
            flipped = em.permute(em.reshape(other, [*lead, m, rows]), [*range(q), q + 1, q])
            spread = em.expand(em.reshape(flipped, [*lead, rows, m, 1]), [*lead, rows, m, cols])
            dims = (q + 1, q + 3) if rows_first else (q, q + 3)
            placed = em.call(aten.diag_embed.default, spread, 0, *dims)
            placed = em.reshape(placed, [*lead, rows * cols, m, cols])
        return em.permute(placed, [*range(axis), q, *range(axis, q), q + 1, q + 2])
    return None


def _matrix_delta(em: Emitter, seed: fx.Node, seed_is_left: bool) -> tuple[int, int] | None:
    """The identity seed's coefficients over its last two dims, or None: a matrix leaf's
    seeds, or (on the left of a product) a vector leaf's seeds viewed as rows ``(..., 1, k)``,
    whose row coefficient is then immaterial and taken row-major."""
    strides = delta_strides(seed)
    if strides is not None and len(strides) == 1 and strides[0] == 1 and seed_is_left:
        rows, cols = em.shape(seed)[-2:] if em.rank(seed) >= 2 else (0, 0)
        return (cols, 1) if rows == 1 else None
    return strides if strides is not None and len(strides) == 2 else None


def _narrow_product(em: Emitter, a: fx.Node, b: fx.Node) -> fx.Node | None:
    """Stacked matrices ``a (..., m, k)`` times a narrow plain ``b (k, n)``, ``n <= 8``.

    One product of ``rows x k`` by ``k x n`` with ``n`` this small runs far below the
    machine's speed (measured on CPU: 0.53 ms for 73984 x 8 by 8 x 8). Taking ``g``
    rows of ``a`` at a time against ``g`` copies of ``b`` on a block diagonal makes it
    ``rows/g x gk`` by ``gk x gn``: ``g`` times the multiply-adds, 2-3x faster (0.22 ms
    with ``g = 2``), and the result keeps ``a``'s row-major layout.
    """
    if em.rank(b) != 2 or em.rank(a) < 3 or em.device.type != "cpu":
        return None
    k, n = em.shape(b)
    rows = math.prod(em.shape(a)[:-1])
    if n > NARROW_MAX_COLUMNS or k > 2 * NARROW_MAX_COLUMNS or rows < NARROW_MIN_ROWS:
        return None
    group = 2 * NARROW_MAX_COLUMNS // n
    while rows % group:
        group //= 2
    if group == 1:
        return None
    blocks = em.call(aten.block_diag.default, [b] * group)
    flat = em.reshape(a, [rows // group, group * k])
    return em.reshape(em.call(aten.mm.default, flat, blocks), [*em.shape(a)[:-1], n])


def _narrow_left(em: Emitter, a: fx.Node, b: fx.Node) -> fx.Node | None:
    """A plain ``a (m, k)`` times stacked narrow matrices ``b (..., k, n)``, ``n <= 8``.

    ``(a @ b)[r] = a @ b[r]`` for every stacked index ``r``: with ``b`` as rows of ``k n``
    numbers, that is one product by ``kron(a.T, I_n)`` (``kn x mn``), whose result is
    already in the row-major layout ``(..., m, n)``. ``einsum`` runs ``a`` against all of
    ``b`` and returns a transposed layout, which every later elementwise op then reads
    with strides (2-3x slower on these shapes). The Kronecker product has ``n`` times the
    multiply-adds; compiled code, which fuses the strided reads into later ops, keeps
    ``einsum`` past ``n = 4`` (measured on the order-3 MLP rows of width 8: ``n = 8``
    this way took the eager code from 7.5 to 6.9 ms, the compiled one from 3.3 to 3.8).
    Where nothing but the function's results reads the product, :mod:`hod.passes.pairs`
    computes it without the zeros, as a permuted view.
    """
    if em.rank(a) != 2 or em.rank(b) < 3 or em.device.type != "cpu":
        return None
    m, k = em.shape(a)
    n = em.shape(b)[-1]
    rows = math.prod(em.shape(b)[:-2])
    widest = NARROW_MAX_COLUMNS // 2 if em.compiling else NARROW_MAX_COLUMNS
    if n > widest or m * n > 64 or k * n > 32 or rows < NARROW_MIN_ROWS // 8:
        return None
    spread = em.call(aten.kron.default, em.permute(a, [1, 0]), em.eye(n, a))
    flat = em.reshape(b, [rows, k * n])
    return em.reshape(em.call(aten.mm.default, flat, spread), [*em.shape(b)[:-2], m, n])


def _needs_einsum(em: Emitter, a: fx.Node, b: fx.Node) -> bool:
    lead_a, lead_b = em.shape(a)[:-2], em.shape(b)[:-2]
    if math.prod(torch.broadcast_shapes(lead_a, lead_b)) < EINSUM_MIN_PRODUCTS:
        return False
    if lead_a and lead_b:
        return lead_a != lead_b
    m, k = em.shape(a)[-2:]
    if m * k * em.shape(b)[-1] >= EINSUM_MAX_PRODUCT_MACS:
        return False  # matmul's products keep pace, and it writes into planned memory
    if lead_b:  # a plain matrix times stacked ones: matmul runs one product per matrix
        k, n = em.shape(b)[-2:]
        return k * n < STACKED_MIN_ENTRIES or not b.meta["val"].is_contiguous()
    return not a.meta["val"].is_contiguous()  # matmul would copy a to fold its axes


@register(aten.mm.default, aten.bmm.default)
def _mm(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    return ctx.bilinear(as_jet(ctx, args[0]), as_jet(ctx, args[1]), _matmul(ctx), rank=None)


@register(aten.addmm.default)
def _addmm(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    bias, a, b = (as_jet(ctx, v) for v in args)
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    em, rank = ctx.em, ctx.em.rank(out)
    products = ctx.bilinear(a, b, _matmul(ctx), rank=None)
    return [
        em.add(em.mul(beta, ctx.align(bias.d(k), k, rank)), em.mul(alpha, products[k - 1]))
        for k in range(1, ctx.order + 1)
    ]


# -- convolution ------------------------------------------------------------------------
# A Leibniz term is one convolution of operands with leading seed axes. The axes fold
# into the batch dim when only the batch-like operand carries them; otherwise they fold
# into the groups, so that copy p of one operand meets copy p of the other and no other.
def _lead(em: Emitter, t: fx.Node, value_rank: int) -> list[int]:
    return list(em.shape(t))[: em.rank(t) - value_rank]


def _fold(em: Emitter, t: fx.Node, value_rank: int, lead: list[int], dim: int) -> fx.Node:
    """``t`` (leading axes, value) broadcast to ``lead`` and merged into value dim ``dim``."""
    own, value = _lead(em, t, value_rank), list(em.shape(t))[em.rank(t) - value_rank:]
    m = len(lead)
    t = em.expand(em.reshape(t, [1] * (m - len(own)) + own + value), lead + value)
    t = em.permute(t, [*range(m, m + dim), *range(m), *range(m + dim, m + value_rank)])
    return em.reshape(t, value[:dim] + [-1] + value[dim + 1:])


def _unfold(em: Emitter, r: fx.Node, lead: list[int], dim: int) -> fx.Node:
    """Inverse of :func:`_fold`: split ``lead`` out of ``dim`` and move it to the front."""
    shape, m = list(em.shape(r)), len(lead)
    r = em.reshape(r, shape[:dim] + lead + [-1] + shape[dim + 1:])
    return em.permute(r, [*range(dim, dim + m), *range(dim), *range(dim + m, len(shape) + m)])


def _shape_only(em: Emitter, shape: list[int], like: fx.Node) -> fx.Node:
    """A zero tensor of ``shape`` that allocates nothing (for arguments read for shape)."""
    zero = em.reshape(em.full_scalar(0.0, like), [1] * len(shape))
    return em.expand(zero, shape)


class _Convolution:
    """One convolution's parameters and the bilinear maps its derivatives are made of.

    ``forward(x, w)`` is the convolution; ``grad_input(g, w)`` and ``grad_weight(g, x)``
    are the parts of its backward. Each takes operands with leading seed axes (or none).
    """

    def __init__(self, em: Emitter, x: fx.Node, w: fx.Node, params: tuple) -> None:
        self.em, self.x, self.w, self.rank = em, x, w, em.rank(x)
        *self.params, self.groups = params

    def _backward(self, g: fx.Node, x: fx.Node, w: fx.Node, copies: int, which: int) -> fx.Node:
        mask = [which == 0, which == 1, False]
        grads = self.em.call(
            aten.convolution_backward.default, g, x, w, None, *self.params,
            self.groups * copies, mask,
        )
        return self.em.call(operator.getitem, grads, which)

    def _batch_like(self, a: fx.Node, b: fx.Node, op) -> fx.Node:
        """``op(a, b, copies, dim)`` on ``a`` (batch first) and a weight-shaped ``b``.

        The seed axes fold into ``a``'s batch dim when ``b`` has none, else into the
        channel dim of ``a`` and the first dim of ``b`` as extra groups.
        """
        em, rank = self.em, self.rank
        lead_a, lead_b = _lead(em, a, rank), _lead(em, b, rank)
        # One channel: seeds as groups of one channel each run faster than as a batch
        # (a (7, 1, 10000) conv1d: 0.43 ms as a batch, 0.12 ms as 7 groups).
        one_channel = self.groups == 1 and em.shape(a)[len(lead_a) + 1] == 1
        if math.prod(lead_b) == 1 and not one_channel:
            b = em.reshape(b, list(em.shape(b))[len(lead_b):])
            folded = _fold(em, a, rank, lead_a, 0)
            return _unfold(em, op(folded, b, math.prod(lead_a), 0), lead_a, 0)
        lead = list(torch.broadcast_shapes(lead_a, lead_b))
        a, b = _fold(em, a, rank, lead, 1), _fold(em, b, rank, lead, 0)
        return _unfold(em, op(a, b, math.prod(lead), 1), lead, 1)

    def forward(self, x: fx.Node, w: fx.Node) -> fx.Node:
        def op(a: fx.Node, b: fx.Node, copies: int, dim: int) -> fx.Node:
            groups = self.groups * (copies if dim == 1 else 1)
            return self.em.call(aten.convolution.default, a, b, None, *self.params, groups)

        em, rank = self.em, self.rank
        lead = _lead(em, w, rank)
        if self._stackable(x, lead):
            # One input against copies of the weight: the copies are output channels of
            # one convolution (as groups, the input would be copied once per seed). A
            # transposed convolution's weight has its output channels second.
            stacked = _fold(em, w, rank, lead, 1 if self.params[3] else 0)
            return _unfold(em, op(self._value(x), stacked, 1, 0), lead, 1)
        return self._batch_like(x, w, op)

    def grad_input(self, g: fx.Node, w: fx.Node) -> fx.Node:
        def op(a: fx.Node, b: fx.Node, copies: int, dim: int) -> fx.Node:
            shape = list(self.em.shape(self.x))
            shape[dim] *= copies
            x = _shape_only(self.em, shape, a)
            return self._backward(a, x, b, copies if dim == 1 else 1, which=0)

        em, rank = self.em, self.rank
        lead = _lead(em, w, rank)
        if self._stackable(g, lead):  # copies of the weight: input channels of one backward
            g = self._value(g)
            stacked = _fold(em, w, rank, lead, 0 if self.params[3] else 1)
            shape = list(em.shape(self.x))
            shape[1] *= math.prod(lead)
            grad = self._backward(g, _shape_only(em, shape, g), stacked, 1, which=0)
            return _unfold(em, grad, lead, 1)
        return self._batch_like(g, w, op)

    def _stackable(self, plain: fx.Node, lead: list[int]) -> bool:
        """Whether ``plain`` has no seed axes while the other operand has ``lead`` ones, in
        an ungrouped convolution: the other operand's copies then stack along channels."""
        return (math.prod(_lead(self.em, plain, self.rank)) == 1 and math.prod(lead) > 1
                and self.groups == 1)

    def _value(self, plain: fx.Node) -> fx.Node:
        """``plain`` without its leading axes of size 1 (see :meth:`_stackable`)."""
        return self.em.reshape(plain, list(self.em.shape(plain))[self.em.rank(plain) - self.rank:])

    def grad_weight(self, g: fx.Node, x: fx.Node) -> fx.Node:
        em, rank = self.em, self.rank
        transposed = bool(self.params[3])
        for seeded, plain, dim in ((g, x, 0 if not transposed else 1),
                                   (x, g, 1 if not transposed else 0)):
            lead = _lead(em, seeded, rank)
            if self._stackable(plain, lead):  # copies of one operand stack along channels
                plain = self._value(plain)
                stacked = _fold(em, seeded, rank, lead, 1)
                shape = list(em.shape(self.w))
                shape[dim] *= math.prod(lead)
                pair = (stacked, plain) if seeded is g else (plain, stacked)
                grad = self._backward(*pair, _shape_only(em, shape, stacked), 1, which=1)
                return _unfold(em, grad, lead, dim)
        lead = list(torch.broadcast_shapes(_lead(em, g, rank), _lead(em, x, rank)))
        copies = math.prod(lead)
        shape = list(em.shape(self.w))
        shape[0] *= copies
        g, x = _fold(em, g, rank, lead, 1), _fold(em, x, rank, lead, 1)
        grad = self._backward(g, x, _shape_only(em, shape, g), copies, which=1)
        return _unfold(em, grad, lead, 0)


def _channel_bias(ctx: DeriveContext, bias: Jet, k: int, rank: int) -> Operand:
    """``D^k bias`` shaped to broadcast over an ``(N, C, *spatial)`` value of ``rank``."""
    d = bias.d(k)
    if d is None:
        return None
    return ctx.em.reshape(d, ctx.lead(k) + [1, -1] + [1] * (rank - 2))


@register(aten.convolution.default)
def _convolution(ctx: DeriveContext, args: tuple, kwargs: dict, out: fx.Node) -> list[Operand]:
    """Bilinear in input and weight; affine in the bias."""
    x, w, bias = as_jet(ctx, args[0]), as_jet(ctx, args[1]), args[2]
    conv = _Convolution(ctx.em, x.primal, w.primal, args[3:])
    products = ctx.bilinear(x, w, conv.forward, rank=None)
    if bias is None:
        return products
    rank = ctx.em.rank(out)
    return [ctx.em.add(p, _channel_bias(ctx, bias, k, rank)) for k, p in enumerate(products, 1)]


@register(aten.convolution_backward.default)
def _convolution_backward(
    ctx: DeriveContext, args: tuple, kwargs: dict, out: tuple
) -> list[list[Operand] | None]:
    """``(grad_input, grad_weight, grad_bias)``: bilinear, bilinear, linear in ``grad``."""
    g, x, w = (as_jet(ctx, a) for a in args[:3])
    mask = args[10]
    conv = _Convolution(ctx.em, x.primal, w.primal, args[4:10])
    sum_dims = [0, *range(2, conv.rank)]
    return [
        ctx.bilinear(g, w, conv.grad_input, rank=None) if mask[0] else None,
        ctx.bilinear(g, x, conv.grad_weight, rank=None) if mask[1] else None,
        ctx.linear(g, lambda t, k: ctx.em.call(
            aten.sum.dim_IntList, t, [d - conv.rank for d in sum_dims]
        )) if mask[2] else None,
    ]


# -- inverse, solve, log-determinant ----------------------------------------------------
# Differentiating ``A X = B`` by Leibniz gives, with ``solve`` applying ``A^-1``,
#   D^m X = A^-1 (D^m B - sum_{T nonempty} D^|T| A[T] @ D^(m-|T|) X[rest]),
# each order from the lower ones; ``D log|det A| = tr(A^-1 DA)`` then gives the
# log-determinant's derivatives by Leibniz on the product ``A^-1 @ DA``.
def _solve_jet(
    ctx: DeriveContext, a: Jet, b: Jet, x: fx.Node, solve: Callable[[fx.Node], fx.Node]
) -> list[Operand]:
    """Derivatives of ``X = A^-1 B`` (matrices ``(..., n, k)``), given ``X``'s node."""
    em = ctx.em
    jet = Jet(x, [])
    for m in range(1, ctx.order + 1):
        terms = [em.neg(em.call(aten.matmul.default, left, right))
                 for chosen, rest in subsets(m) if chosen
                 for left, right in [(ctx.operand(a, chosen, m), ctx.operand(jet, rest, m))]
                 if left is not None and right is not None]
        rhs = em.sum_terms([ctx.align(b.d(m), m, em.rank(x)), *terms])
        jet.derivs.append(None if rhs is None else solve(rhs))
    return jet.derivs


def _as_matrix(ctx: DeriveContext, b: Jet) -> Jet:
    """A vector right-hand side ``(..., n)`` as a one-column matrix ``(..., n, 1)``."""
    em = ctx.em
    unsqueeze = lambda t: None if t is None else em.call(aten.unsqueeze.default, t, -1)  # noqa: E731
    return Jet(unsqueeze(b.primal), [unsqueeze(d) for d in b.derivs])


@register(aten.linalg_inv_ex.default)
def _inverse(ctx: DeriveContext, args: tuple, kwargs: dict, out: tuple) -> list:
    """``(inverse, info)``: ``B`` is the (constant) identity."""
    inverse = out[0]
    identity = as_jet(ctx, None)
    derivs = _solve_jet(
        ctx, args[0], identity, inverse, lambda t: ctx.em.call(aten.matmul.default, inverse, t)
    )
    return [derivs, None]


@register(aten._linalg_solve_ex.default)
def _solve(ctx: DeriveContext, args: tuple, kwargs: dict, out: tuple) -> list:
    """``(result, LU, pivots, info)`` of ``A X = B``; solves reuse the LU factors."""
    if not kwargs.get("left", True):
        raise UnsupportedOperatorError(
            "hod: torch.linalg.solve(A, B, left=False) has no derivative rule.\n"
            "  Fix: solve the transposed system, linalg.solve(A.mT, B.mT).mT."
        )
    a, b = as_jet(ctx, args[0]), as_jet(ctx, args[1])
    em = ctx.em
    lu, pivots = out[1], out[2]
    vector = em.rank(b.primal) == em.rank(a.primal) - 1
    x = out[0]
    if vector:
        b, x = _as_matrix(ctx, b), em.call(aten.unsqueeze.default, x, -1)
    derivs = _solve_jet(
        ctx, a, b, x, lambda t: em.call(aten.linalg_lu_solve.default, lu, pivots, t)
    )
    if vector:
        derivs = [None if d is None else em.call(aten.squeeze.dim, d, -1) for d in derivs]
    return [derivs, None, None, None]


def _logabsdet_derivs(ctx: DeriveContext, a: Jet, lu: fx.Node, pivots: fx.Node) -> list:
    """Derivatives of ``log|det A|`` from the LU factors of ``A^T`` that det and slogdet
    return.

    ``D^m log|det A| = sum_T tr(D^|T| A^-1 [T] @ D^(m-|T|) A [{0} + rest])`` over subsets
    ``T`` of the positions after the first, the first seed axis staying with ``D A``.
    """
    em = ctx.em
    n = em.shape(a.primal)[-1]
    identity = em.eye(n, a.primal)
    # det and slogdet return the LU factors of A^T (torch works in column-major), so the
    # adjoint solve is the one that inverts A.
    inverse = em.call(aten.linalg_lu_solve.default, lu, pivots, identity, adjoint=True)
    inverse_jet = Jet(inverse, _solve_jet(
        ctx, a, as_jet(ctx, None), inverse, lambda t: em.call(aten.matmul.default, inverse, t)
    ))
    derivs = []
    for m in range(1, ctx.order + 1):
        terms = []
        for chosen, rest in subsets(m - 1):
            left = ctx.operand(inverse_jet, tuple(i + 1 for i in chosen), m)
            right = ctx.operand(a, (0, *(i + 1 for i in rest)), m)
            if left is not None and right is not None:
                terms.append(_trace_of_product(em, left, right))
        derivs.append(em.sum_terms(terms))
    return derivs


@register(aten._linalg_slogdet.default)
def _slogdet(ctx: DeriveContext, args: tuple, kwargs: dict, out: tuple) -> list:
    """``(sign, logabsdet, LU, pivots)``; only ``logabsdet`` has derivatives."""
    return [None, _logabsdet_derivs(ctx, args[0], out[2], out[3]), None, None]


@register(aten._linalg_det.default)
def _det(ctx: DeriveContext, args: tuple, kwargs: dict, out: tuple) -> list:
    """``(det, LU, pivots)``: ``det = sign * exp(log|det|)``, so every derivative of det
    with respect to ``log|det|`` is det itself (Faà di Bruno with an exp-like tower).

    torch's own backward of det runs through an SVD, which has no rule: a scalar det is
    differentiated in forward mode, where this rule applies.
    """
    det, lu, pivots = out
    logabsdet = Jet(det, _logabsdet_derivs(ctx, args[0], lu, pivots))
    return [ctx.unary(logabsdet, lambda j: det), None, None]


def _trace_of_product(em: Emitter, p: fx.Node, q: fx.Node) -> fx.Node:
    """``tr(p @ q)`` over the last two dims, broadcasting the rest."""
    product = em.call(aten.mul.Tensor, p, em.call(aten.transpose.int, q, -2, -1))
    return em.call(aten.sum.dim_IntList, product, [-2, -1])
