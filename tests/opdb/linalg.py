"""Op database entries: products, convolutions, inverse, solve and log-determinant.

Products are bilinear, so orders >= 3 of the plain op vanish; each entry composes the op
with ``sin`` (or differentiates a nonlinear op) so every order is nonzero. Where
torch.func's own nesting is wrong (linalg.solve and slogdet at order 3: checked against
finite differences of order 2) the entry's ``ref`` is an equivalent formula torch.func
differentiates correctly.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import D, OpInfo, add, rand

aten = torch.ops.aten


def _entry(name: str, fn, samples, aten_ops: tuple, argnums=0, slow_from: int = 4, ref=None):
    """``fn`` followed by sin, and its sum (differentiated in reverse-last)."""
    for suffix, wrap in (("", lambda g: lambda *a: g(*a).sin()),
                         (".sum", lambda g: lambda *a: g(*a).sin().sum())):
        add(OpInfo(
            name + suffix, wrap(fn), samples, aten=aten_ops, argnums=argnums,
            slow_from=slow_from, family="linalg", ref=ref and wrap(ref),
        ))


def _well_conditioned(n: int, *batch: int) -> torch.Tensor:
    return rand(*batch, n, n) + 3 * torch.eye(n, dtype=D)


_entry("mm", torch.mm, lambda: [(rand(3, 4), rand(4, 2))], (aten.mm.default,), (0, 1))
_entry("bmm", torch.bmm, lambda: [(rand(2, 3, 4), rand(2, 4, 2))], (aten.bmm.default,),
       (0, 1))
_entry("matmul_vv", torch.matmul, lambda: [(rand(4), rand(4))], (aten.sum.dim_IntList,),
       (0, 1))
_entry("matmul_vm", torch.matmul, lambda: [(rand(4), rand(4, 3))],
       (aten.mm.default, aten.squeeze.dim), (0, 1))
_entry("matmul_mv", torch.matmul, lambda: [(rand(3, 4), rand(4))], (aten.sum.dim_IntList,),
       (0, 1))
_entry("matmul_batched", torch.matmul, lambda: [(rand(2, 1, 3, 4), rand(2, 4, 2))],
       (aten.bmm.default,), (0, 1))
_entry("matmul_batched_vector", torch.matmul, lambda: [(rand(2, 3, 4), rand(4))],
       (aten.sum.dim_IntList,), (0, 1))
_entry("addmm", lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2),
       lambda: [(rand(3, 2), rand(3, 4), rand(4, 2)), (rand(2), rand(3, 4), rand(4, 2))],
       (aten.addmm.default,), (0, 1, 2))
_entry("baddbmm", lambda c, a, b: torch.baddbmm(c, a, b, beta=0.5, alpha=2),
       lambda: [(rand(2, 3, 2), rand(2, 3, 4), rand(2, 4, 2))], (aten.bmm.default,), (0, 1, 2))
_entry("einsum", lambda a, b: torch.einsum("bij,jk->bik", a, b),
       lambda: [(rand(2, 3, 4), rand(4, 2))], (aten.bmm.default,), (0, 1))
_entry("linear", F.linear, lambda: [(rand(3, 4), rand(2, 4), rand(2))], (aten.addmm.default,),
       (0, 1, 2))
_entry("linear_no_bias", F.linear, lambda: [(rand(2, 3, 4), rand(2, 4))],
       (aten.mm.default,), (0, 1))
_entry("dot", torch.dot, lambda: [(rand(4), rand(4))], (aten.sum.dim_IntList,), (0, 1))
_entry("mv", torch.mv, lambda: [(rand(3, 4), rand(4))], (aten.sum.dim_IntList,), (0, 1))
_entry("outer", torch.outer, lambda: [(rand(3), rand(4))], (aten.mul.Tensor,), (0, 1))

_CONV = (aten.convolution.default, aten.convolution_backward.default)
_entry("conv1d", lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1),
       lambda: [(rand(1, 2, 5), rand(2, 2, 3), rand(2))], _CONV, (0, 1, 2), slow_from=3)
# A captured weight and one input channel: the seeds run as groups (see _batch_like).
_KERNEL = torch.tensor([[[0.5, -1.0, 2.0]], [[1.5, 0.25, -0.75]]], dtype=torch.float64)
_entry("conv1d_one_channel", lambda x: F.conv1d(x, _KERNEL.to(x), padding=1) ** 2,
       lambda: [(rand(2, 1, 5),)], _CONV, (0,), slow_from=3)
_entry("conv2d", lambda x, w: F.conv2d(x, w, padding=1, dilation=2, groups=2),
       lambda: [(rand(1, 2, 3, 3), rand(2, 1, 2, 2))], _CONV, (0, 1), slow_from=3)
_entry("conv3d", lambda x, w: F.conv3d(x, w, stride=(1, 2, 1)),
       lambda: [(rand(1, 1, 3, 3, 3), rand(2, 1, 2, 2, 2))], _CONV, (0, 1), slow_from=3)
_entry("conv_transpose2d", lambda x, w: F.conv_transpose2d(x, w, stride=2),
       lambda: [(rand(1, 2, 2, 2), rand(2, 1, 2, 2))], _CONV, (0, 1), slow_from=3)

_entry("inv", torch.linalg.inv, lambda: [(_well_conditioned(3),), (_well_conditioned(2, 2),)],
       (aten.linalg_inv_ex.default, aten.mm.default))
_entry("solve", torch.linalg.solve,
       lambda: [(_well_conditioned(3), rand(3, 2)), (_well_conditioned(3), rand(3))],
       (aten._linalg_solve_ex.default,), (0, 1),
       ref=lambda a, b: torch.linalg.inv(a) @ b)


def _cofactor_det(a: torch.Tensor) -> torch.Tensor:
    """``det`` of a small matrix by the Leibniz formula (sum over permutations)."""
    n = a.shape[-1]
    total = a.new_zeros(a.shape[:-2])
    for perm in itertools.permutations(range(n)):
        inversions = sum(p > q for i, p in enumerate(perm) for q in perm[i + 1:])
        total = total + (-1) ** inversions * torch.stack(
            [a[..., i, p] for i, p in enumerate(perm)]
        ).prod(0)
    return total


def _with_sum(g):
    """``g`` next to a second output: two outputs are differentiated in forward mode."""
    return lambda a: (g(a), a.sum())


def _logabsdet(a):
    return torch.linalg.slogdet(a)[1]


def _cofactor_logabsdet(a):
    return _cofactor_det(a).abs().log()


add(
    OpInfo("slogdet", _logabsdet, lambda: [(_well_conditioned(3),)],
           aten=(aten._linalg_slogdet.default, aten._linalg_solve_ex.default),
           family="linalg", ref=_cofactor_logabsdet),
    OpInfo("slogdet.forward", _with_sum(_logabsdet), lambda: [(_well_conditioned(3, 2),)],
           aten=(aten._linalg_slogdet.default,), family="linalg",
           ref=_with_sum(_cofactor_logabsdet)),
    # torch's backward of det goes through an SVD: hod falls back to forward mode.
    OpInfo("det", torch.linalg.det, lambda: [(_well_conditioned(4),)],
           aten=(aten._linalg_det.default,), family="linalg", ref=_cofactor_det, degree=4),
    OpInfo("det.forward", _with_sum(torch.linalg.det), lambda: [(_well_conditioned(4, 2),)],
           aten=(aten._linalg_det.default,), family="linalg", ref=_with_sum(_cofactor_det),
           degree=4),
    # Up to 3 x 3, det is traced as its Leibniz expansion (hod/decompositions/linalg.py).
    OpInfo("det.expanded", torch.linalg.det, lambda: [(_well_conditioned(3),)],
           aten=(aten.mul.Tensor,), family="linalg", ref=_cofactor_det, degree=3),
)
