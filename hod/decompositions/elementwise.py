"""hod decompositions: elementwise ops and reductions, rewritten into ops with rules.

Each keeps torch's value and torch's choice of derivative where the function has a kink
or ties (``max.dim`` picks its index, ``clamp`` passes the gradient at its bounds).
Non-floating inputs keep torch's own kernels (``NotImplemented``).
"""

from __future__ import annotations

import math

import torch
from torch._decomp import decomposition_table

from ._registry import register_decomposition

aten = torch.ops.aten

# torch's reference implementations already use ops with rules (where/ge, sum/pow/abs/amax)
# and keep torch's derivative conventions.
for _op in (aten.clamp.Tensor, aten.linalg_vector_norm.default):
    register_decomposition(_op)(decomposition_table[_op])


@register_decomposition(aten.detach.default)
def _keep_detach(x: torch.Tensor):
    """Keep ``detach`` in the graph (its rule stops derivatives); torch's table turns it
    into ``alias``, which passes them on."""
    return NotImplemented


@register_decomposition(aten.celu.default)
def _celu(x: torch.Tensor, alpha: float = 1.0):
    """As torch defines it, so that ``elu``'s rule gives torch's derivatives at 0."""
    return aten.elu.default(x, alpha, 1.0, 1.0 / alpha)


@register_decomposition(aten.elu_backward.default)
def _elu_backward(grad, alpha, scale, input_scale, is_result: bool, x: torch.Tensor):
    """torch's ELU gradient, including its derivative in ``x`` at 0: zero, as torch's
    ``elu_double_backward`` (it masks with ``x < 0``), while the value takes the negative
    branch (torch's ``x <= 0``)."""
    slope_at_zero = grad * (input_scale * alpha * scale)
    if is_result:
        negative = grad * input_scale * (x + alpha * scale)
    else:
        negative = slope_at_zero * torch.exp(x * input_scale)
    return torch.where(x > 0, grad * scale, torch.where(x < 0, negative, slope_at_zero))


def _all_dims(x: torch.Tensor, dim) -> list[int]:
    """The dims a reduction with ``dim`` covers (``None`` or empty: all)."""
    if dim is None or (not isinstance(dim, int) and len(dim) == 0):
        return list(range(x.dim()))
    return [dim] if isinstance(dim, int) else list(dim)


@register_decomposition(aten.prod.dim_int)
def _prod_dim(x: torch.Tensor, dim: int, keepdim: bool = False, *, dtype=None):
    """Pairwise products of halves: ``log2(n)`` multiplications, exact with zeros."""
    x = x if dtype is None else x.to(dtype)
    if not x.is_floating_point():
        return NotImplemented
    if x.dim() == 0:
        return x.clone()
    dim = dim % x.dim()
    if x.shape[dim] == 0:
        x = torch.ones_like(x.sum(dim, keepdim=True))
    while x.shape[dim] > 1:
        if x.shape[dim] % 2:
            x = torch.cat([x, torch.ones_like(x.narrow(dim, 0, 1))], dim)
        half = x.shape[dim] // 2
        x = x.narrow(dim, 0, half) * x.narrow(dim, half, half)
    return x if keepdim else x.squeeze(dim)


@register_decomposition(aten.prod.default)
def _prod(x: torch.Tensor, *, dtype=None):
    return _prod_dim(x.reshape(-1), 0, dtype=dtype)


@register_decomposition(aten.cumprod.default)
def _cumprod(x: torch.Tensor, dim: int, *, dtype=None):
    """Inclusive scan by doubling: ``x_i <- x_i * x_(i - s)`` for ``s = 1, 2, 4, ...``."""
    x = x if dtype is None else x.to(dtype)
    if not x.is_floating_point():
        return NotImplemented
    n = x.shape[dim] if x.dim() else 1
    shift = 1
    while shift < n:
        ones = torch.ones_like(x.narrow(dim, 0, shift))
        x = x * torch.cat([ones, x.narrow(dim, 0, n - shift)], dim)
        shift *= 2
    return x


@register_decomposition(aten.var.correction)
def _var(x: torch.Tensor, dim=None, *, correction=None, keepdim: bool = False):
    """``sum((x - mean)^2) / max(n - correction, 0)``, ``correction`` 1 by default."""
    if not x.is_floating_point():
        return NotImplemented
    dims = _all_dims(x, dim)
    n = math.prod(x.shape[d] for d in dims)
    centered = x - x.mean(dims, keepdim=True)
    squares = (centered * centered).sum(dims, keepdim=keepdim)
    return squares / max(n - (1 if correction is None else correction), 0)


@register_decomposition(aten.var_mean.correction)
def _var_mean(x: torch.Tensor, dim=None, *, correction=None, keepdim: bool = False):
    if not x.is_floating_point():
        return NotImplemented
    var = _var(x, dim, correction=correction, keepdim=keepdim)
    return var, x.mean(_all_dims(x, dim), keepdim=keepdim)


def _selected(x: torch.Tensor, dim: int, keepdim: bool, index: torch.Tensor):
    """``(values, indices)`` of ``max.dim``/``min.dim`` given the kept-dim ``index``.

    The value is read through a one-hot mask, so its derivative is the chosen entry's
    alone, as torch's (ties included).
    """
    dim = dim % x.dim()
    positions = torch.arange(x.shape[dim], device=x.device).view(
        [-1] + [1] * (x.dim() - dim - 1)
    )
    values = torch.where(positions == index, x, x.new_zeros(())).sum(dim, keepdim=True)
    if keepdim:
        return values, index
    return values.squeeze(dim), index.squeeze(dim)


@register_decomposition(aten.max.dim)
def _max_dim(x: torch.Tensor, dim: int, keepdim: bool = False):
    if not x.is_floating_point() or x.dim() == 0:
        return NotImplemented
    return _selected(x, dim, keepdim, torch.argmax(x, dim, keepdim=True))


@register_decomposition(aten.min.dim)
def _min_dim(x: torch.Tensor, dim: int, keepdim: bool = False):
    if not x.is_floating_point() or x.dim() == 0:
        return NotImplemented
    return _selected(x, dim, keepdim, torch.argmin(x, dim, keepdim=True))
