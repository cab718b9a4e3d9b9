"""Op database entries: normalisation, pooling, embedding, attention and losses.

Losses are scalars, so hod differentiates their gradient graphs (reverse-last); layers
get an entry for the op and one for its sum, exercising both graphs. Where torch.func's
nesting is wrong (the weight-input block of layer_norm's and batch_norm's second
derivative, checked against finite differences) or impossible (fused attention), the
entry's ``ref`` is the same function written with plain ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import D, OpInfo, add, rand

aten = torch.ops.aten

_TARGET = torch.tensor([1, 0, 3])
_IDX = torch.tensor([[0, 2], [1, 2]])


def _layer(name: str, fn, samples, aten_ops: tuple, argnums=0, ref=None, **kw):
    """``fn`` followed by sin, and its sum (reverse-last)."""
    for suffix, wrap in (("", lambda g: lambda *a: g(*a).sin()),
                         (".sum", lambda g: lambda *a: g(*a).sin().sum())):
        add(OpInfo(
            name + suffix, wrap(fn), samples, aten=aten_ops, argnums=argnums, family="nn",
            ref=ref and wrap(ref), **kw,
        ))


def _loss(name: str, fn, samples, aten_ops: tuple, argnums=0, degree: int | None = None):
    # A lambda: make_fx would want every parameter of fn's own signature.
    add(OpInfo(name, lambda *a: fn(*a), samples, aten=aten_ops, argnums=argnums, family="nn",
               degree=degree))


def _normalized(x: torch.Tensor, dims: list[int], eps: float) -> torch.Tensor:
    mean = x.mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)


def _batch_norm_ref(x, w, b):
    return _normalized(x, [0, 2], 1e-5) * w[:, None] + b[:, None]


def _attention_ref(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


_CAUSAL = torch.ones(3, 3, dtype=torch.bool).tril()

_layer("log_softmax", lambda x: torch.log_softmax(x, 0), lambda: [(rand(3, 4),)],
       (aten._log_softmax.default,))
_layer("softmax_neg_dim", lambda x: torch.softmax(x, -1), lambda: [(rand(2, 3, 2),)],
       (aten._softmax.default,))
_layer("layer_norm", lambda x, w, b: F.layer_norm(x, (4,), w, b),
       lambda: [(rand(2, 4), rand(4), rand(4))], (aten.rsqrt.default,), (0, 1, 2),
       ref=lambda x, w, b: _normalized(x, [-1], 1e-5) * w + b)
_layer("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b),
       lambda: [(rand(2, 4, 3), rand(4), rand(4))], (aten.rsqrt.default,), (0, 1, 2))
_layer("batch_norm_eval",
       lambda x, w, b: F.batch_norm(x, torch.zeros(3, dtype=D), torch.ones(3, dtype=D) * 2,
                                    w, b, training=False),
       lambda: [(rand(4, 3, 2), rand(3), rand(3))], (aten.rsqrt.default,), (0, 1, 2))
_layer("batch_norm_train", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
       lambda: [(rand(4, 3, 2), rand(3), rand(3))], (aten.rsqrt.default,), (0, 1, 2),
       ref=_batch_norm_ref)
_layer("dropout_p0", lambda x: F.dropout(x, 0.0) * x, lambda: [(rand(3, 4),)],
       (aten.mul.Tensor,))
_layer("dropout_eval", lambda x: F.dropout(x, 0.5, training=False) * x,
       lambda: [(rand(3, 4),)], (aten.mul.Tensor,))
_layer("embedding", lambda w: F.embedding(_IDX, w), lambda: [(rand(3, 4),)],
       (aten.index.Tensor, aten.index_put.default))
_layer("avg_pool1d", lambda x: F.avg_pool1d(x, 2), lambda: [(rand(1, 2, 6),)],
       (aten.avg_pool2d.default, aten.avg_pool2d_backward.default))
_layer("avg_pool2d", lambda x: F.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=False),
       lambda: [(rand(1, 2, 3, 3),)], (aten.avg_pool2d.default, aten.avg_pool2d_backward.default))
_layer("max_pool1d", lambda x: F.max_pool1d(x, 2), lambda: [(rand(1, 2, 6),)],
       (aten.index.Tensor, aten.scatter_add.default))
_layer("max_pool2d", lambda x: F.max_pool2d(x, 2, stride=1, padding=1),
       lambda: [(rand(1, 2, 3, 3),)], (aten.index.Tensor, aten.constant_pad_nd.default))
_layer("attention", F.scaled_dot_product_attention,
       lambda: [(rand(1, 2, 3, 4), rand(1, 2, 3, 4), rand(1, 2, 3, 4))], (aten.bmm.default,),
       (0, 1, 2), ref=_attention_ref, slow_from=3)
_layer("attention_causal",
       lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
       lambda: [(rand(1, 3, 2), rand(1, 3, 2), rand(1, 3, 2))], (aten.bmm.default,),
       (0, 1, 2), ref=lambda q, k, v: _attention_ref(q, k, v, _CAUSAL), slow_from=3)



def _gru(x, w_ih, w_hh, b_ih, b_hh):
    """One GRU layer over a batch-first sequence: torch's decomposition of its cell writes
    the gates in place and transposes in place, below functionalization."""
    h0 = torch.zeros(1, x.shape[0], w_hh.shape[1], dtype=x.dtype)
    return torch.gru(x, h0, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, True)[0]


_layer("gru", _gru,
       lambda: [(rand(1, 3, 2), rand(6, 2), rand(6, 2), rand(6), rand(6))],
       (aten.transpose.int,), (0, 1, 2), slow_from=3)

_loss("cross_entropy", lambda x: F.cross_entropy(x, _TARGET), lambda: [(rand(3, 4),)],
      (aten.gather.default, aten.scatter.value))
_loss("cross_entropy_sum_smoothing",
      lambda x: F.cross_entropy(x, _TARGET, reduction="sum", label_smoothing=0.1),
      lambda: [(rand(3, 4),)], (aten.gather.default, aten.copy_.default))
_loss("cross_entropy_none", lambda x: F.cross_entropy(x, _TARGET, reduction="none"),
      lambda: [(rand(3, 4),)], (aten.gather.default,))
_loss("cross_entropy_probs", F.cross_entropy,
      lambda: [(rand(3, 4), torch.softmax(rand(3, 4), -1))], (aten._log_softmax.default,),
      (0, 1))
_loss("nll_loss", lambda x: F.nll_loss(x, _TARGET, reduction="sum"), lambda: [(rand(3, 4),)],
      (aten.gather.default,), degree=1)
_loss("mse_loss", F.mse_loss, lambda: [(rand(3, 4), rand(3, 4))], (aten.mean.default,), (0, 1),
      degree=2)
_loss("l1_loss", F.l1_loss, lambda: [(rand(3, 4), rand(3, 4))], (aten.mean.default,), (0, 1),
      degree=1)
_loss("huber_loss", lambda x, y: F.huber_loss(x, y, delta=0.5),
      lambda: [(rand(3, 4), rand(3, 4))], (aten.mean.default,), (0, 1), degree=2)
_loss("smooth_l1_loss", lambda x, y: F.smooth_l1_loss(x, y, beta=0.5),
      lambda: [(rand(3, 4), rand(3, 4))], (aten.mean.default,), (0, 1), degree=2)
_loss("binary_cross_entropy", F.binary_cross_entropy,
      lambda: [(rand(3, 4, low=0.1, high=0.9), rand(3, 4, low=0.0, high=1.0))],
      (aten.mean.default,), (0, 1))
_loss("binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits,
      lambda: [(rand(3, 4), rand(3, 4, low=0.0, high=1.0))], (aten.mean.default,), (0, 1))
_loss("kl_div", lambda x, y: F.kl_div(x, y, reduction="batchmean"),
      lambda: [(torch.log_softmax(rand(3, 4), -1), torch.softmax(rand(3, 4), -1))],
      (aten.sum.dim_IntList,), (0, 1))
