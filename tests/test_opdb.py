"""Every op database entry, every order up to its maximum, against nested torch.func."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_tree, reference
from opdb import OPS, OpInfo

import hod
import hod.passes.memory
from hod._tracing import trace
from hod.rules import RULES


def _cases():
    for info in OPS:
        for order in range(1, info.max_order + 1):
            marks = [pytest.mark.slow] if order >= info.slow_from else []
            yield pytest.param(info, order, id=f"{info.name}-order{order}", marks=marks)


@pytest.mark.parametrize("info, order", list(_cases()))
def test_op_matches_torch_func(info: OpInfo, order: int):
    """Every sample; the derivatives are not all zero unless the entry's degree says so
    (a sample on a flat piece, such as relu's negative inputs, may be zero)."""
    fn = hod.derivative(info.fn, order, info.argnums)
    ref = reference(info.ref or info.fn, order, info.argnums)
    samples = info.samples()
    assert_same_tree([fn(*s) for s in samples], [ref(*s) for s in samples],
                     rtol=info.rtol, atol=info.atol, expect_zero=info.vanishes_at(order))


def _traced_ops(info: OpInfo) -> set:
    """ATen ops in the forward and gradient graphs of the entry's samples."""
    ops = set()
    for sample in info.samples():
        def scalar(*args):
            out = info.fn(*args)
            return sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)))

        for fn in (info.fn, torch.func.grad(scalar, info.argnums)):
            gm = trace(fn, sample, "opdb")  # as hod traces: functionalized, decomposed
            ops |= {n.target for n in gm.graph.nodes if n.op == "call_function"}
    return ops


@pytest.mark.parametrize("info", OPS, ids=[i.name for i in OPS])
def test_entry_exercises_the_ops_it_claims(info: OpInfo):
    missing = set(info.aten) - _traced_ops(info)
    assert not missing, f"{info.name} claims {missing} but its graphs do not contain them"


def test_every_rule_has_a_database_entry():
    claimed = {op for info in OPS for op in info.aten}
    unclaimed = sorted(str(op) for op in set(RULES) - claimed)
    assert not unclaimed, f"rules without an op database entry: {unclaimed}"


@pytest.mark.parametrize(
    "info, order",
    [pytest.param(i, o, id=f"{i.name}-order{o}") for i in OPS for o in (1, 2) if o <= i.max_order],
)
def test_op_with_every_tensor_in_reused_memory(info: OpInfo, order: int, monkeypatch):
    """The planned code (every tensor written into the arena or a result slot) gives the
    right results, on a first call and on a second one with other inputs while the first's
    results are held (their memory must not be written again)."""
    monkeypatch.setattr(hod.passes.memory, "MIN_PLANNED_BYTES", 0)
    fn = hod.derivative(info.fn, order, info.argnums)
    ref = reference(info.ref or info.fn, order, info.argnums)
    actual, expected = [], []
    for sample in info.samples():
        other = tuple(
            t * 0.97 if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in sample
        )
        first = fn(*sample)
        second = fn(*other)
        actual += [first, second]
        expected += [ref(*sample), ref(*other)]
    assert_same_tree(actual, expected, rtol=info.rtol, atol=info.atol,
                     expect_zero=info.vanishes_at(order))
