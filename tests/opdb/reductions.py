"""Op database entries: reductions and scans.

hod's planner differentiates a scalar (an all-reduction, or a ``.sum`` entry) through
torch's gradient graph (reverse-last), so those entries test the ops of the reduction's
backward formula; entries keeping one output per row (``*_rows`` and most ``dim=``
entries) push derivatives forward through the reduction itself. Entries of max/min-like
reductions add a sample with ties, where hod must split or pick as torch does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import D, OpInfo, add, rand

aten = torch.ops.aten

# Samples with ties: (3, 4) reduces to a few numbers, (4, 2) keeps one per row.
_TIES = torch.tensor([[0.3, 0.7, 0.7, -0.2], [0.5, 0.5, 0.5, 0.1], [0.0, -0.5, 0.9, 0.9]], dtype=D)
_TIES_ROWS = torch.tensor([[0.5, 0.5], [0.1, 0.3], [-0.7, -0.7], [-0.2, 0.4]], dtype=D)


def _grid(*shape: int, low: float = -1.0, high: float = 1.0, ties: torch.Tensor | None = None):
    """A ``shape`` tensor, the same shape transposed (non-contiguous), and ``ties``."""

    def samples() -> list[tuple]:
        flipped = rand(*reversed(shape), low=low, high=high).permute(*reversed(range(len(shape))))
        out = [(rand(*shape, low=low, high=high),), (flipped,)]
        return out if ties is None else [*out, (ties,)]

    return samples


def reduction(name: str, fn: Callable, aten_ops: tuple, samples: Callable, **kw) -> None:
    kw.setdefault("max_order", 4)
    add(OpInfo(name, fn, samples, aten=aten_ops, family="reduction", **kw))


reduction("sum", lambda x: x.sum(), (aten.sum.dim_IntList,), _grid(3, 4), degree=1)
reduction("sum_dims", lambda x: x.sum((0, -1)), (aten.sum.dim_IntList,), _grid(2, 3, 2), degree=1)
reduction("sum_rows", lambda x: x.sum(-1, keepdim=True), (aten.sum.dim_IntList,),
          _grid(4, 2), degree=1)
reduction("mean", lambda x: x.mean(), (aten.mean.default, aten.div.Scalar), _grid(3, 4), degree=1)
reduction("mean_dims", lambda x: x.mean((0, 2), keepdim=True), (aten.mean.dim,),
          _grid(2, 3, 2), degree=1)
reduction("mean_rows", lambda x: x.mean(1), (aten.mean.dim,), _grid(4, 2), degree=1)
# No exact zeros in prod/cumprod samples: there torch.func's own third derivative is wrong
# (tests/test_independent_references.py checks zeros against the exact products).
reduction("prod", lambda x: x.prod(), (aten.flip.default,), _grid(3, 3))
reduction("prod_dim", lambda x: x.prod(1), (aten.mul.Tensor,), _grid(3, 5))
reduction("prod_rows", lambda x: x.prod(-1, keepdim=True), (aten.cat.default,),
          _grid(4, 3), degree=3)
reduction("amax", lambda x: x.amax(1), (aten.amax.default,), _grid(3, 4, ties=_TIES), degree=1)
reduction("amax_dims", lambda x: x.amax((0, 1)), (aten.amax.default,),
          _grid(3, 4, ties=_TIES), degree=1)
reduction("amax_rows", lambda x: x.amax(-1, keepdim=True), (aten.amax.default,),
          _grid(4, 2, ties=_TIES_ROWS), degree=1)
reduction("amin", lambda x: x.amin(0), (aten.amin.default,), _grid(3, 4, ties=_TIES), degree=1)
reduction("amin_rows", lambda x: x.amin(-1), (aten.amin.default,),
          _grid(4, 2, ties=_TIES_ROWS), degree=1)
reduction("max", lambda x: x.max(), (aten.max.default,), _grid(3, 4, ties=_TIES), degree=1)
reduction("min", lambda x: x.min(), (aten.min.default,), _grid(3, 4, ties=_TIES), degree=1)
# max.dim/min.dim read the chosen entry through a one-hot mask (a decomposition).
reduction("max_dim", lambda x: x.max(1).values, (aten.where.self,),
          _grid(3, 4, ties=_TIES), degree=1)
reduction("max_dim_rows", lambda x: x.max(-1, keepdim=True)[0], (aten.where.self,),
          _grid(4, 2, ties=_TIES_ROWS), degree=1)
reduction("max_dim.sum", lambda x: (x.max(1).values ** 2).sum(), (aten.where.self,),
          _grid(3, 4, ties=_TIES), degree=2)
reduction("amax.sum", lambda x: (x.amax(0) ** 2).sum(), (aten.amax.default,),
          _grid(3, 4, ties=_TIES), degree=2)
reduction("min_dim", lambda x: x.min(0).values, (aten.where.self,),
          _grid(3, 4, ties=_TIES), degree=1)
reduction("min_dim_rows", lambda x: x.min(1)[0], (aten.where.self,),
          _grid(4, 2, ties=_TIES_ROWS), degree=1)
reduction("logsumexp", lambda x: torch.logsumexp(x, 1), (aten.amax.default, aten.abs.default),
          _grid(3, 4))
reduction("logsumexp_rows", lambda x: torch.logsumexp(x, (-1,), keepdim=True),
          (aten.exp.default,), _grid(4, 2))
reduction("var", lambda x: x.var(1), (aten.mean.dim,), _grid(3, 4), degree=2)
reduction("var_all", lambda x: x.var(), (aten.mean.dim,), _grid(3, 4), degree=2)
reduction("var_correction", lambda x: torch.var(x, dim=(0, 2), correction=0, keepdim=True),
          (aten.mean.dim,), _grid(2, 3, 2), degree=2)
reduction("var_unbiased_rows", lambda x: x.var(-1, unbiased=False), (aten.mean.dim,),
          _grid(4, 2), degree=2)
reduction("std", lambda x: x.std(1, correction=2), (aten.sqrt.default,), _grid(3, 4))
reduction("std_rows", lambda x: x.std(-1, keepdim=True), (aten.sqrt.default,),
          _grid(4, 2), degree=1)
reduction("std_mean", lambda x: torch.std_mean(x, 0)[0] + torch.std_mean(x, 0)[1],
          (aten.sqrt.default,), _grid(3, 4))
reduction("norm", lambda x: x.norm(), (aten.pow.Tensor_Scalar,), _grid(3, 4))
reduction("norm_rows", lambda x: torch.norm(x, dim=1), (aten.pow.Tensor_Scalar,), _grid(4, 2))
reduction("vector_norm_1", lambda x: torch.linalg.vector_norm(x, 1, dim=1),
          (aten.abs.default, aten.sign.default), _grid(3, 4), degree=1)
reduction("vector_norm_inf", lambda x: torch.linalg.vector_norm(x, float("inf"), dim=1),
          (aten.abs.default, aten.amax.default), _grid(3, 4, ties=_TIES), degree=1)
reduction("vector_norm_neg_inf", lambda x: torch.linalg.vector_norm(x, -float("inf")),
          (aten.abs.default, aten.amin.default), _grid(3, 4), degree=1)
reduction("vector_norm_p3", lambda x: torch.linalg.vector_norm(x, 3, dim=(0, 1)),
          (aten.abs.default, aten.pow.Tensor_Scalar), _grid(3, 4), max_order=3)
reduction(
    "vector_norm_p3.5", lambda x: torch.linalg.vector_norm(x, 3.5, dim=-1, keepdim=True),
    (aten.abs.default, aten.pow.Tensor_Scalar), _grid(4, 2), max_order=2,
    notes="torch.func's reference fails from order 3 on (an in-place pow_ under vmap)",
)
reduction("cumsum", lambda x: x.cumsum(1), (aten.cumsum.default,),
          _grid(3, 4), max_order=5, degree=1)
reduction("cumsum.sum", lambda x: (x.cumsum(-2) ** 2).sum(),
          (aten.cumsum.default, aten.flip.default), _grid(3, 4), degree=2)
reduction("cumprod", lambda x: x.cumprod(1), (aten.cat.default,), _grid(3, 5), max_order=3)
reduction("cumprod.sum", lambda x: x.cumprod(0).sum(), (aten.mul.Tensor,),
          lambda: [(rand(5),)])
