"""Reused memory (hod.passes.memory) on a model whose derivatives are not zero: a result the
caller holds, or a view of one, keeps its values through later calls; intermediates that
share the arena get the right values. Found by the mutation run (issue 21): a slot that
never reallocates, or reallocates only past one extra reference, passed the older tests."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_tree, reference

import hod
import hod.passes.memory

ARGNUMS = (0, 1, 2)


@pytest.fixture(autouse=True)
def everything_planned(monkeypatch):
    monkeypatch.setattr(hod.passes.memory, "MIN_PLANNED_BYTES", 0)


def _tanh_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Two tanh layers and a weighted read-out: every derivative order is non-zero."""
    h = torch.tanh(x @ w1)
    y = torch.tanh(h @ w2) * h
    return (y * torch.linspace(0.5, 1.5, y.shape[-1], dtype=y.dtype)).sum()


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g)
    return x, *(torch.randn(5, 5, dtype=torch.float64, generator=g) for _ in range(2))


def _clone(tree):
    return torch.utils._pytree.tree_map(torch.clone, tree)


def test_held_results_keep_their_values_across_calls():
    fn = hod.hessian(_tanh_mlp, ARGNUMS)
    calls = [_inputs(seed) for seed in range(3)]
    assert fn.lower(*calls[0]).memory is not None  # the planned code runs
    held, copies = [], []
    for args in calls:
        held.append(fn(*args))
        copies.append(_clone(held[-1]))
    for args, result, copy in zip(calls, held, copies, strict=True):
        assert_same_tree(result, copy)
        assert_same_tree(result, reference(_tanh_mlp, 2, ARGNUMS)(*args))


def test_a_view_of_a_dropped_result_keeps_its_values():
    fn = hod.hessian(_tanh_mlp, 1)
    first = _inputs(0)
    row = fn(*first)[2]  # the result itself is dropped; its row views its memory
    kept = row.clone()
    fn(*_inputs(1))
    torch.testing.assert_close(row, kept, rtol=0, atol=0)
    assert_same_tree(row, reference(_tanh_mlp, 2, 1)(*first)[2])


def test_dropped_results_free_their_memory_for_the_next_call():
    """The next call writes the slot again once the caller dropped the result (values stay
    right either way; this checks that the memory is reused at all)."""
    fn = hod.hessian(_tanh_mlp, 1)
    address = fn(*_inputs(0)).data_ptr()  # the result is dropped at once
    second = fn(*_inputs(1))
    assert second.data_ptr() == address
    assert_same_tree(second, reference(_tanh_mlp, 2, 1)(*_inputs(1)))


@pytest.mark.parametrize("order", [2, 3])
def test_third_order_values_with_everything_in_reused_memory(order: int):
    """Many intermediates of different lifetimes share the arena: overlapping two that are
    alive together, or a result placed in the arena, changes the values."""
    fn = hod.derivative(_tanh_mlp, order, ARGNUMS)
    for seed in range(2):
        args = _inputs(seed)
        assert_same_tree(fn(*args), reference(_tanh_mlp, order, ARGNUMS)(*args))
