"""Public twins of ATen overloads in generated code (hod._codegen.FAST_TWINS, ``narrow``
for ``slice``, torch's ``einsum`` binding): every twin computes bit for bit what its
overload computes (values, dtype, shape, strides, out= buffers), the code calls the twin
by a name that resolves to it, and zoo rows whose code called ``torch.ops`` no longer do
and still match torch.func in float64; shapes are tuples and constants plain attributes."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_same_tree, reference
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import _get_qualified_name

import hod
from bench.zoo_rows import ZOO_ROWS, make_problem
from hod import _codegen
from hod._codegen import FAST_TWINS

aten = torch.ops.aten
DTYPES = [torch.float32, torch.float64]


def _calls(dtype: torch.dtype) -> dict[object, list[tuple[tuple, dict]]]:
    """Calls ``(args, kwargs)`` of every twinned overload (``sum.IntList_out`` is twinned
    where its dims are not empty); ``out`` buffers are filled with a marker first."""
    return {**_first_twins(dtype), **_call_bound_twins(dtype)}


def _first_twins(dtype: torch.dtype) -> dict[object, list[tuple[tuple, dict]]]:
    """One call of each of the first twins (arithmetic, views, matrix products)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    x, y, z = (r(2, 3) + 0.5 for _ in range(3))
    m, s, u = r(3, 3), r(2, 3, 3), r(1, 3, 1)
    a = aten
    return {op: [call] for op, call in {
        a.mm.default: ((m, m), {}), a.bmm.default: ((s, s), {}), a.matmul.default: ((x, m), {}),
        a.mul.Tensor: ((x, y), {}), a.add.Tensor: ((x, y), {}), a.sub.Tensor: ((x, y), {}),
        a.div.Tensor: ((x, y), {}), a.neg.default: ((x,), {}), a.exp.default: ((x,), {}),
        a.log.default: ((x,), {}), a.tanh.default: ((x,), {}), a.sigmoid.default: ((x,), {}),
        a.relu.default: ((x - 1,), {}), a.sin.default: ((x,), {}), a.cos.default: ((x,), {}),
        a.reciprocal.default: ((x,), {}), a.where.self: ((x > 1, x, y), {}),
        a.permute.default: ((s, [2, 0, 1]), {}), a.view.default: ((x, [3, 2]), {}),
        a.expand.default: ((u, [2, 3, 4]), {}), a.as_strided.default: ((m, [2, 2], [1, 3], 1), {}),
        a._softmax.default: ((x, 1, False), {}), a._log_softmax.default: ((x, 1, False), {}),
        a.gt.Scalar: ((x, 1.0), {}), a.le.Scalar: ((x, 1.0), {}), a.cat.default: (([x, y], 1), {}),
        a.constant_pad_nd.default: ((x, [1, 2], 0.5), {}), a.diag_embed.default: ((x, 1, 0, 2), {}),
        a.movedim.int: ((s, 0, 2), {}), a.eye.default: ((3,), {"dtype": dtype}),
        a.addcmul.default: ((x, y, z), {"value": 0.5}),
        a.addmm.default: ((m, m, m), {"beta": 2, "alpha": 0.5}),
        a.clone.default: ((m.T,), {"memory_format": torch.contiguous_format}),
        a.split_with_sizes.default: ((m, [1, 2], 1), {}), a.squeeze.dims: ((u, [0, 2]), {}),
        a.squeeze.dim: ((u, 0), {}), a.unsqueeze.default: ((x, 1), {}),
        a.select.int: ((m, 1, 2), {}), a.transpose.int: ((s, 0, 2), {}), a.t.default: ((m,), {}),
        a.mul.Scalar: ((x, 3.0), {}), a.pow.Tensor_Scalar: ((x, 3), {}),
        a.sqrt.default: ((x,), {}), a.rsqrt.default: ((x,), {}), a.abs.default: ((x - 1,), {}),
        a.ge.Scalar: ((x, 1.0), {}), a.lt.Scalar: ((x, 1.0), {}),
    }.items()}


def _call_bound_twins(dtype: torch.dtype) -> dict[object, list[tuple[tuple, dict]]]:
    """Calls of the twins added for call-bound code: comparisons, reductions, fills, and
    the ``out=`` forms of the planned code, with numbers and 0-dim tensors as operands."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    a, b, c = r(4, 6), r(4, 6), r(4, 6)
    m, n, v = r(4, 5), r(5, 3), r(5)
    half = torch.tensor(0.5, dtype=dtype)
    nan = torch.tensor([0.0, float("nan"), 1.0], dtype=dtype)

    def out(*shape):
        return torch.full(shape, 7.0, dtype=dtype)

    return {
        aten.ne.Scalar: [((a.round(), 0), {}), ((nan, 0.0), {})],
        aten.eq.Scalar: [((a.round(), 1), {}), ((nan, float("nan")), {})],
        aten.eq.Tensor: [((a.round(), b.round()), {})],
        aten.div.Scalar: [((a, 3), {}), ((a, 0.1), {})],
        aten.logical_not.default: [((a.round(),), {}), ((a > 0,), {})],
        aten.any.dim: [((a > 1, 1), {}), ((a > 1, -1, True), {})],
        aten.where.ScalarSelf: [((a > 0, 0.0, b), {}), ((a > 0, 2, b), {})],
        aten.mean.dim: [((a, [1]), {}), ((a, [0, 1], True), {}), ((a, [-1], False), {})],
        aten.clamp.default: [((a, -0.5, 0.5), {}), ((a, None, 0.1), {})],
        aten.argmax.default: [((a,), {}), ((a, 1, True), {})],
        aten.reshape.default: [((a, [6, 4]), {}), ((a.t(), [24]), {})],
        aten.convolution.default: [(
            (r(2, 3, 7), r(4, 3, 3), r(4), [2], [1], [1], False, [0], 1), {}
        )],
        aten.full.default: [(([2, 3], 0), {"dtype": dtype, "layout": torch.strided,
                                            "device": torch.device("cpu"), "pin_memory": False}),
                            (([3], 1.5), {"dtype": dtype}), (([2], 2), {})],
        aten.zeros.default: [(([2, 3],), {"dtype": dtype, "device": torch.device("cpu")})],
        aten.scalar_tensor.default: [((0.25,), {"dtype": dtype}), ((3,), {})],
        aten.arange.start_step: [((0, 7, 2), {"dtype": dtype}), ((1, 4, 1), {})],
        aten.mm.out: [((m, n), {"out": out(4, 3)})],
        aten.bmm.out: [((r(2, 4, 5), r(2, 5, 3)), {"out": out(2, 4, 3)})],
        aten.mv.out: [((m, v), {"out": out(4)})],
        aten.matmul.out: [((m, n), {"out": out(4, 3)}), ((r(2, 4, 5), n), {"out": out(2, 4, 3)})],
        aten.mul.out: [((a, b), {"out": out(4, 6)}), ((a, half), {"out": out(4, 6)}),
                       ((a, 0.1), {"out": out(4, 6)})],
        aten.add.out: [((a, b), {"out": out(4, 6)}), ((a, b), {"alpha": -2, "out": out(4, 6)}),
                       ((a, 0.1), {"alpha": 3, "out": out(4, 6)})],
        aten.sub.out: [((a, b), {"out": out(4, 6)}), ((a, half), {"alpha": 3, "out": out(4, 6)})],
        aten.div.out: [((a, b), {"out": out(4, 6)})],
        aten.addcmul.out: [((a, b, c), {"out": out(4, 6)}),
                           ((a, b, c), {"value": -1, "out": out(4, 6)}),
                           ((a, b, c), {"value": 0.3, "out": out(4, 6)})],
        aten.cat.out: [(([a, b], 0), {"out": out(8, 6)}), (([a, b], -1), {"out": out(4, 12)})],
        aten.where.self_out: [((a > 0, b, c), {"out": out(4, 6)})],
        aten.neg.out: [((a,), {"out": out(4, 6)})],
        aten.exp.out: [((a,), {"out": out(4, 6)})],
        aten.log.out: [((a.abs(),), {"out": out(4, 6)})],
        aten.tanh.out: [((a,), {"out": out(4, 6)})],
        aten.sigmoid.out: [((a,), {"out": out(4, 6)})],
        aten.sin.out: [((a,), {"out": out(4, 6)})],
        aten.cos.out: [((a,), {"out": out(4, 6)})],
        aten.reciprocal.out: [((a,), {"out": out(4, 6)})],
        aten.sqrt.out: [((a.abs(),), {"out": out(4, 6)})],
        aten.rsqrt.out: [((a.abs(),), {"out": out(4, 6)})],
        aten.pow.Tensor_Scalar_out: [((a, 3), {"out": out(4, 6)}), ((a, 0.5), {"out": out(4, 6)})],
        aten._softmax.out: [((a, 1, False), {"out": out(4, 6)})],
        aten._log_softmax.out: [((a, -1, False), {"out": out(4, 6)})],
        aten.sum.IntList_out: [((a, [1]), {"out": out(4)}),
                               ((a, [0, 1], True), {"out": out(1, 1)}),
                               ((a, [0]), {"dtype": torch.float64, "out": out(6).double()})],
    }


def _same(actual: object, expected: object) -> None:
    """Bit for bit: dtype, shape, strides and values (NaN where NaN is)."""
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for x, y in zip(actual, expected, strict=True):
            _same(x, y)
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride()
    assert torch.equal(actual, expected) or torch.equal(actual.isnan(), expected.isnan()) and \
        torch.equal(actual.nan_to_num(), expected.nan_to_num())


def _clone_outs(kwargs: dict) -> dict:
    return {k: v.clone() if k == "out" else v for k, v in kwargs.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_twins_compute_what_their_overloads_compute(dtype):
    calls = _calls(dtype)
    assert set(FAST_TWINS) | {aten.sum.IntList_out} == set(calls)
    for op, examples in calls.items():
        twin = torch.sum if op is aten.sum.IntList_out else FAST_TWINS[op]  # non-empty dims
        for args, kwargs in examples:
            mine, theirs = _clone_outs(kwargs), _clone_outs(kwargs)
            got, expected = twin(*args, **mine), op(*args, **theirs)
            _same(got, expected)
            if "out" in kwargs:
                assert got is mine["out"] and expected is theirs["out"]
                _same(mine["out"], theirs["out"])


def test_every_twin_is_called_by_a_name_that_resolves_to_it():
    """fx prints a call by the function's qualified name: ``torch.X`` must be the twin,
    not a Python wrapper of the same name (``torch.einsum`` is one)."""
    for twin in [*FAST_TWINS.values(), torch.narrow, torch.sum]:
        name = _get_qualified_name(twin)
        resolved = torch
        for part in name.split(".")[1:]:
            resolved = getattr(resolved, part)
        assert resolved is twin, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_einsum_is_the_overload_without_the_python_wrapper(dtype):
    g = torch.Generator().manual_seed(1)
    x, y, z = (torch.randn(3, 4, 5, generator=g, dtype=dtype) for _ in range(3))
    for equation, operands in [("bij,bkj->bik", [x, y]), ("bij,bkj,bkl->bil", [x, y, z]),
                               ("...ij,...kj->...ik", [x, y]), ("bij->bji", [x])]:
        _same(_codegen.einsum(equation, operands), aten.einsum.default(equation, operands))


@pytest.mark.parametrize("bounds", [
    (0, 0, 3), (0, 1, None), (0, None, 2), (1, -3, -1), (1, -10, 4), (-1, 2, 2**63 - 1),
    (-1, 4, 2), (0, 5, 9), (1, -1, None), (2, 0, 4), (2, 3, 3),
])
def test_slices_become_narrows_with_the_same_view(bounds):
    """Negative and out-of-range bounds, empty results; a slice with a step stays."""
    dim, start, end = bounds
    x = torch.randn(4, 6, 5, dtype=torch.float64)[:, 1:]  # not at storage offset 0

    def f(t):
        return aten.slice.Tensor(t, dim, start, end), aten.slice.Tensor(t, dim, 0, None, 2)

    graph = make_fx(f)(x).graph
    module = _codegen._finish(graph, {}, compiling=False)
    targets = [n.target for n in module.graph.nodes if n.op == "call_function"]
    assert targets == [torch.narrow, aten.slice.Tensor]
    for got, expected in zip(module(x), f(x), strict=True):
        _same(got, expected)
        assert got.storage_offset() == expected.storage_offset()
        assert got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


@pytest.mark.parametrize(("index", "twin"), [(4, "torch.narrow("), (6, "torch.mean(")])
def test_rows_call_no_twinned_overload_through_torch_ops(index, twin):
    """The GRU input row sliced its gate products with ``slice.Tensor``, the transformer
    input row ``mean.dim``, ``eq.Scalar`` and others through ``torch.ops``; shapes are
    tuples, constants of the code."""
    row = ZOO_ROWS[index].quick()
    problem = make_problem(row, 0, torch.float64)
    fn = hod.hessian(problem.f)
    code = fn.lower(problem.x).planned_module.code
    called = set(re.findall(r"torch\.ops\.aten\.([\w]+\.[\w]+)", code))
    twinned = {op.__name__ for op in FAST_TWINS} | {"slice.Tensor", "einsum.default"}
    assert not called & twinned, called & twinned
    assert twin in code
    assert not re.search(r"[(,] ?\[-?\d", code), "a list of ints built on every call"
    assert_same_tree(fn(problem.x), reference(problem.f, 2)(problem.x))


def test_code_reads_its_constants_without_module_getattr(monkeypatch):
    """Captured parameters and the planned code's numbers are plain attributes of the
    generated modules: reading a registered one goes through ``Module.__getattr__``."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = model.double()
    x = torch.randn(4, dtype=torch.float64)
    fn = hod.hessian(lambda v: model(v).sum())
    expected = torch.func.hessian(lambda v: model(v).sum())(x)
    fn(x)
    reads = []
    getattr_ = torch.nn.Module.__getattr__

    def counted(self, name):
        reads.append(name)
        return getattr_(self, name)

    monkeypatch.setattr(torch.nn.Module, "__getattr__", counted)
    with torch.no_grad():
        plain = fn(x)
    watched = fn(x)  # parameters require grad: recomputed, and differentiable
    assert reads == [] and "self._const_" in fn.lower(x).code
    assert_same_tree([plain, watched], [expected, expected])
    grads = torch.autograd.grad(watched.sum(), list(model[0].parameters()))
    expected_grads = torch.func.grad(lambda p: torch.func.hessian(
        lambda v: torch.func.functional_call(model, p, (v,)).sum())(x).sum()
    )(dict(model.named_parameters()))
    assert_same_tree(grads, (expected_grads["0.weight"], expected_grads["0.bias"]))
