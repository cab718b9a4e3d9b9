"""Functions the core tests differentiate."""

from __future__ import annotations

import torch


def seed_mlp(X, *params):
    """The seed notebook's MLP: relu layers, softmax on the last one, summed."""
    T = X
    for i, P in enumerate(params):
        T = T @ P
        T = torch.softmax(T, dim=1) if i == len(params) - 1 else torch.relu(T)
    return T.sum()


def tanh_mlp(x, W1, b1, W2, b2):
    """A two-layer tanh network with biases and a sigmoid head, mean-reduced."""
    h = torch.tanh(x @ W1 + b1)
    return torch.sigmoid(h @ W2 + b2).mean()


def vector_valued(x):
    """A non-scalar output: exp, log, sin, cos, pow and division."""
    return torch.exp(torch.sin(x)) * torch.cos(x) ** 2 + torch.log(1.5 + x * x) / (2.0 + x)


def broadcasting(x, y):
    """Two arguments broadcasting against each other, with a partial reduction."""
    z = x.unsqueeze(-1) * y - y.exp() / 3.0
    return (torch.tanh(z).sum(dim=1, keepdim=True) - x.mean()).squeeze(1)


def tanh_loss(x, W):
    """A scalar loss of an input ``x`` (a vector or a batch of rows) and weights ``W``."""
    return torch.tanh(x @ W).pow(2).sum()


def weighted_seed_mlp(X, *params):
    """The seed MLP read out with column weights 1, 2, ...: the same layers (relu, softmax
    on the last), the same paths through the planner, and derivatives that are not zero."""
    T = X
    for i, P in enumerate(params):
        T = T @ P
        T = torch.softmax(T, dim=1) if i == len(params) - 1 else torch.relu(T)
    weights = torch.arange(1, T.shape[1] + 1, dtype=T.dtype, device=T.device)
    return (T * weights).sum()
