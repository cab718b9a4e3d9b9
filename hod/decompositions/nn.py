"""hod decompositions: normalisation, pooling, embedding and attention ops.

Most come from ``torch._decomp`` (not part of the core ATen set, so opt in here); the
fused attention backward has none in torch and is written out as matmuls and softmax.
"""

from __future__ import annotations

import math

import torch
from torch._decomp import decomposition_table

from ._registry import HOD_DECOMPOSITIONS, register_decomposition

aten = torch.ops.aten

_FROM_TORCH = (
    aten.embedding.default,
    aten.max_pool2d_with_indices.default,
    aten.max_pool2d_with_indices_backward.default,
)
HOD_DECOMPOSITIONS.update({op: decomposition_table[op] for op in _FROM_TORCH})


def _moments(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` over ``dims`` (kept as size-1 dims)."""
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    return mean, (centered * centered).mean(dims, keepdim=True)


def _affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            shape: list[int]) -> torch.Tensor:
    """``x * weight + bias`` with the parameters viewed as ``shape``."""
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


@register_decomposition(aten.native_layer_norm.default)
def _layer_norm(
    x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)``; mean and rstd keep the normalised dims with size 1."""
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    mean, var = _moments(x, dims)
    rstd = torch.rsqrt(var + eps)
    return _affine((x - mean) * rstd, weight, bias, list(normalized_shape)), mean, rstd


@register_decomposition(aten.native_group_norm.default)
def _group_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    n: int, c: int, hxw: int, groups: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)`` for ``x`` of shape ``(N, C, *)``; mean, rstd ``(N, groups)``."""
    grouped = x.reshape(n, groups, (c // groups) * hxw)
    mean, var = _moments(grouped, [2])
    rstd = torch.rsqrt(var + eps)
    normalized = ((grouped - mean) * rstd).reshape(x.shape)
    shape = [c] + [1] * (x.dim() - 2)
    return _affine(normalized, weight, bias, shape), mean.squeeze(2), rstd.squeeze(2)


@register_decomposition(aten.native_batch_norm.default)
def _batch_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    training: bool, momentum: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, save_mean, save_rstd)`` for ``x`` of shape ``(N, C, *)``.

    Training mode normalises with the batch statistics and, like the eager kernel,
    updates the running statistics in place; eval mode uses the running statistics
    (and, like the CPU kernel, saves empty statistics).
    """
    shape = [x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        dims = [0, *range(2, x.dim())]
        mean, var = _moments(x, dims)
        rstd = torch.rsqrt(var + eps)
        _update_running(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
        saved = mean.reshape(-1), rstd.reshape(-1)
    else:
        mean = running_mean.reshape(shape)
        rstd = torch.rsqrt(running_var.reshape(shape) + eps)
        saved = x.new_zeros((0,)), x.new_zeros((0,))
    return _affine((x - mean) * rstd, weight, bias, shape), *saved


def _update_running(
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    mean: torch.Tensor, var: torch.Tensor, momentum: float, n: int,
) -> None:
    """The eager kernel's in-place update (the running variance is unbiased)."""
    if running_mean is not None:
        running_mean.copy_(momentum * mean.reshape(-1) + (1 - momentum) * running_mean)
    if running_var is not None:
        unbiased = var.reshape(-1) * (n / (n - 1))
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)


def _attention_weights(
    query: torch.Tensor, key: torch.Tensor, is_causal: bool,
    attn_mask: torch.Tensor | None, scale: float | None,
) -> tuple[torch.Tensor, float]:
    """``softmax(q k^T * scale + mask)``, shape ``(..., L, S)``, and the scale used."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(
            scores.shape[-2:], dtype=torch.bool, device=scores.device
        ).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1), scale


@register_decomposition(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def _flash_attention_backward(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    out: torch.Tensor, logsumexp: torch.Tensor, dropout_p: float, is_causal: bool,
    *, attn_mask: torch.Tensor | None = None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention ``(N, H, L, E)`` w.r.t. query, key and value, recomputed.

    The weights are recomputed from query and key (not read from ``logsumexp``) so the
    gradients stay differentiable functions of the inputs.
    """
    torch._check(dropout_p == 0.0, lambda: "hod differentiates attention without dropout")
    weights, scale = _attention_weights(query, key, is_causal, attn_mask, scale)
    grad_value = weights.transpose(-2, -1) @ grad_out
    grad_weights = grad_out @ value.transpose(-2, -1)
    grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
    grad_query = grad_scores @ key * scale
    grad_key = grad_scores.transpose(-2, -1) @ query * scale
    return grad_query, grad_key, grad_value
