"""Op database entries: views, copies, concatenation, slicing and indexing.

Each entry applies ``sin`` after the op where the op alone is linear, so that orders >= 2
are nonzero and the op's derivative rule is exercised at every order (in the forward
graph and, through ``.sum`` in reverse-last, in the gradient graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import D, OpInfo, add, rand

aten = torch.ops.aten

_IDX = torch.tensor([0, 2, 1, 2])
_GATHER = torch.tensor([[0, 1, 1], [2, 0, 1]])


def _shape(name: str, fn, samples, aten_ops: tuple, argnums=0, family: str = "shape"):
    """An entry for ``fn`` followed by sin, and one for its sum (reverse-last)."""
    add(
        OpInfo(name, lambda *a: fn(*a).sin(), samples, aten=aten_ops, argnums=argnums,
               family=family),
        OpInfo(f"{name}.sum", lambda *a: fn(*a).sin().sum(), samples, aten=aten_ops,
               argnums=argnums, family=family),
    )


_shape("view", lambda x: x.view(6, 2), lambda: [(rand(3, 4),)],
       (aten.view.default,))
_shape("reshape", lambda x: x.t().reshape(12), lambda: [(rand(3, 4),)],
       (aten.permute.default, aten.view.default))
_shape("flatten", lambda x: x.flatten(1), lambda: [(rand(2, 3, 2),)],
       (aten.view.default,))
_shape("permute", lambda x: x.permute(2, 0, -2), lambda: [(rand(2, 3, 2),)],
       (aten.permute.default,))
_shape("transpose", lambda x: x.transpose(0, -1), lambda: [(rand(2, 3, 2),)],
       (aten.permute.default,))
_shape("movedim", lambda x: torch.movedim(x, 0, -1), lambda: [(rand(2, 3, 2),)],
       (aten.permute.default,))
_shape("expand", lambda x: x.expand(3, 2, 4), lambda: [(rand(2, 1),)],
       (aten.expand.default,))
_shape("squeeze_unsqueeze", lambda x: x.squeeze(1).unsqueeze(0), lambda: [(rand(2, 1, 3),)],
       (aten.squeeze.dims, aten.unsqueeze.default))
_shape("cat", lambda x, y: torch.cat([x, y], -1), lambda: [(rand(2, 3), rand(2, 2))],
       (aten.cat.default,), argnums=(0, 1))
_shape("stack", lambda x, y: torch.stack([x, y], 1), lambda: [(rand(2, 3), rand(2, 3))],
       (aten.cat.default,), argnums=(0, 1))
_shape("split", lambda x: torch.split(x, [1, 3], 1)[1] * torch.split(x, 2, 1)[0].sum(),
       lambda: [(rand(2, 4),)], (aten.split_with_sizes.default,))
_shape("chunk", lambda x: x.chunk(2, 0)[1], lambda: [(rand(4, 2),)],
       (aten.split_with_sizes.default,))
_shape("unbind", lambda x: x.unbind(1)[0] * x.unbind(1)[2], lambda: [(rand(2, 3),)],
       (aten.slice.Tensor, aten.squeeze.dims))
_shape("narrow", lambda x: x.narrow(1, 1, 2), lambda: [(rand(2, 4),)],
       (aten.slice.Tensor,))
_shape("strided_slice", lambda x: x[:, ::2], lambda: [(rand(2, 5),)],
       (aten.slice.Tensor, aten.slice_scatter.default))
_shape("select", lambda x: x[:, 1], lambda: [(rand(2, 5),)],
       (aten.select.int,))
_shape("diagonal", lambda x: torch.diagonal(x, 1, -2, -1), lambda: [(rand(2, 3, 4),)],
       (aten.diagonal.default, aten.diagonal_scatter.default), family="linalg")
_shape("trace", lambda x: torch.trace(x) * x, lambda: [(rand(3, 3),)],
       (aten.diagonal.default,), family="linalg")
_shape("tril", lambda x: torch.tril(x, 1), lambda: [(rand(3, 4),)], (aten.where.self,),
       family="linalg")
_shape("triu", lambda x: torch.triu(x, -1), lambda: [(rand(4, 3),)], (aten.where.self,),
       family="linalg")
_shape("to_copy", lambda x: x.to(torch.float32).to(D), lambda: [(rand(2, 3),)],
       (aten._to_copy.default,))
_shape("flip", lambda x: x.flip(1), lambda: [(rand(2, 3),)], (aten.flip.default,))
_shape("roll", lambda x: x.roll((1, 2), (0, 1)), lambda: [(rand(2, 3),)],
       (aten.index_select.default,))
_shape("repeat", lambda x: x.repeat(2, 1, 2), lambda: [(rand(2, 3),)],
       (aten.repeat.default,))
_shape("pad", lambda x: F.pad(x, (1, 2, 0, -1), value=0.5), lambda: [(rand(2, 3),)],
       (aten.constant_pad_nd.default,))
_shape("diag_embed", lambda x: torch.diag_embed(x, 1), lambda: [(rand(2, 3),)],
       (aten.diagonal.default,), family="linalg")
_shape("index_select", lambda x: x.index_select(1, _IDX), lambda: [(rand(2, 3),)],
       (aten.index_select.default, aten.index_put.default), family="indexing")
_shape("gather", lambda x: x.gather(1, _GATHER), lambda: [(rand(2, 3),)],
       (aten.gather.default, aten.scatter_add.default), family="indexing")
_shape("index_rows", lambda x: x[_IDX], lambda: [(rand(3, 2),)],
       (aten.index.Tensor, aten.index_put.default), family="indexing")
_shape("index_cols", lambda x: x[:, _IDX], lambda: [(rand(2, 3),)],
       (aten.index.Tensor,), family="indexing")
_shape("index_apart", lambda x: x[_IDX, :, _IDX.flip(0)], lambda: [(rand(3, 2, 3),)],
       (aten.index.Tensor,), family="indexing")
_shape("scatter_add", lambda x, s: x.scatter_add(1, _GATHER, s),
       lambda: [(rand(2, 3), rand(2, 3))], (aten.scatter_add.default, aten.gather.default),
       argnums=(0, 1), family="indexing")
_shape("index_add", lambda x, s: x.index_add(0, _IDX, s), lambda: [(rand(3, 2), rand(4, 2))],
       (aten.index_put.default, aten.index_select.default), argnums=(0, 1),
       family="indexing")
_shape("index_copy", lambda x, s: x.index_put((_IDX[:2],), s), lambda: [(rand(3, 2), rand(2))],
       (aten.index_put.default,), argnums=(0, 1), family="indexing")
_shape("scatter", lambda x, s: x.scatter(1, _GATHER[:, :1], s),
       lambda: [(rand(2, 3), rand(2, 1))], (aten.scatter.src, aten.scatter.value),
       argnums=(0, 1), family="indexing")
