"""torch.nn modules in float64, float32 and bfloat16: Hessians w.r.t. the input and the
parameters against nested torch.func in float64.

CPU kernels differ by dtype: float32 LSTMs dispatch to oneDNN's ``mkldnn_rnn_layer``,
convolutions to oneDNN, attention to a fused flash kernel, none of which the float64 path
takes; hod traces every dtype to the ops of the float64 path. The reference runs the
module copied to float64, with the math attention kernel (torch.func cannot differentiate
the fused CPU one twice) and layer norm in plain ops (torch.func's second derivative of
layer norm is wrong in its weight-input block, which a transformer layer's parameter
Hessian reaches).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, reference
from torch import fx, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves

import hod
import hod._adjoint
from hod._tracing import _functional_pointwise

aten = torch.ops.aten


def _conv_norm_pool():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AvgPool2d(1)).eval()


#: name: (module factory, input shape, how the module is called).
MODULES = {
    "linear": (lambda: nn.Linear(4, 3), (2, 4), None),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 2, 6), None),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3), (1, 2, 5, 5), None),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 2, 3), (1, 2, 3, 3), None),
    "conv_batchnorm_pool": (_conv_norm_pool, (2, 2, 6, 6), None),
    "layer_norm": (lambda: nn.LayerNorm(4), (3, 4), None),
    "group_norm": (lambda: nn.GroupNorm(2, 4), (2, 4, 3), None),
    "lstm": (lambda: nn.LSTM(3, 4, batch_first=True), (2, 4, 3), lambda m, x: m(x)[0]),
    "gru": (lambda: nn.GRU(3, 4, batch_first=True), (2, 4, 3), lambda m, x: m(x)[0]),
    "rnn": (lambda: nn.RNN(3, 4, batch_first=True), (2, 4, 3), lambda m, x: m(x)[0]),
    "multihead_attention": (lambda: nn.MultiheadAttention(4, 2, batch_first=True), (2, 3, 4),
                            lambda m, x: m(x, x, x)[0]),
    "transformer_encoder_layer": (
        lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).eval(),
        (2, 3, 4), None),
}

#: bfloat16 results are compared as bfloat16 computes: every entry of a module's output
#: carries about 3 significant digits, and a Hessian sums many of them.
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _loss(name: str, module: nn.Module):
    """A scalar of the module's output with nonzero second derivatives everywhere."""
    call = MODULES[name][2] or (lambda m, x: m(x))

    def of_input(x):
        return torch.tanh(call(module, x)).sum()

    def of_params(params, x):
        return torch.tanh(call(lambda *a: functional_call(module, params, a), x)).sum()

    return of_input, of_params


def _setup(name: str, dtype: torch.dtype):
    factory, shape, _ = MODULES[name]
    torch.manual_seed(sum(map(ord, name)))
    module = factory()
    x = torch.randn(*shape, dtype=torch.float64)
    double = copy.deepcopy(module).double()
    return module.to(dtype), double, x


def _plain_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
    dims = list(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def _reference(fn, *args):
    """``fn(*args)`` with the math attention kernel, and layer norm written with plain
    ops: torch.func's nesting gets its weight-input block wrong (see tests/opdb/nn.py)."""
    original = F.layer_norm
    F.layer_norm = _plain_layer_norm
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args)
    finally:
        F.layer_norm = original


def _tolerances(dtype: torch.dtype, expected) -> tuple[float, float]:
    """TOLERANCES, but bfloat16's absolute one relative to the largest entry: its 8-bit
    mantissa makes an absolute 0.1 meaningless for Hessians of order 0.1."""
    if dtype is not torch.bfloat16:
        return TOLERANCES[dtype]
    largest = max(float(t.abs().max()) for t in tree_leaves(expected))
    return 0.05, 0.03 * largest


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODULES)
def test_hessian_wrt_the_input(name, dtype):
    module, double, x = _setup(name, dtype)
    actual = hod.hessian(_loss(name, module)[0])(x.to(dtype))
    expected = _reference(reference(_loss(name, double)[0], 2), x)
    assert actual.dtype == dtype
    assert_same_tree(actual, cast(expected, dtype), *_tolerances(dtype, expected))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODULES)
def test_hessian_wrt_the_parameters(name, dtype):
    module, double, x = _setup(name, dtype)
    params = {k: v.detach() for k, v in module.named_parameters()}
    params64 = {k: v.detach() for k, v in double.named_parameters()}
    actual = hod.hessian(_loss(name, module)[1])(params, x.to(dtype))
    expected = _reference(reference(_loss(name, double)[1], 2), params64, x)
    assert_same_tree(actual, cast(expected, dtype), *_tolerances(dtype, expected))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", MODULES)
def test_output_derivatives_in_forward_mode(name, dtype):
    """The module's whole output (through tanh, not a scalar of it) to order 2, which hod
    takes in forward mode when the output is not much smaller than the input: the recurrent
    cells' decompositions write their gates in place (``chunk.add_(x).sigmoid_()``), which
    the trace reads as plain ops."""
    module, double, x = _setup(name, dtype)
    call = MODULES[name][2] or (lambda m, x: m(x))
    fn = hod.derivative(lambda x: torch.tanh(call(module, x)), 2)
    expected = _reference(reference(lambda x: torch.tanh(call(double, x)), 2), x)
    assert_same_tree(fn(x.to(dtype)), cast(expected, dtype), *_tolerances(dtype, expected))
    if name in ("lstm", "gru", "rnn"):
        assert fn.lower(x.to(dtype)).mode == "forward"


@pytest.mark.parametrize("base_read_later", [False, True])
def test_in_place_gates_become_plain_ops_unless_shared(base_read_later):
    """An in-place write into a piece of a fresh tensor that only its split reads is the
    plain op; where the split tensor is read after the write (it sees the write), the write
    stays in place."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    base = graph.call_function(aten.mul.Tensor, (x, 2.0))
    first = graph.call_function(operator.getitem, (
        graph.call_function(aten.split.Tensor, (base, 2)), 0))
    written = graph.call_function(aten.add_.Tensor, (first, 1.0))
    gated = graph.call_function(aten.sigmoid_.default, (written,))
    graph.output([gated, base] if base_read_later else [gated])
    gm = fx.GraphModule(nn.Module(), graph)
    _functional_pointwise(gm)
    expected = (aten.add_.Tensor, aten.sigmoid_.default) if base_read_later else (
        aten.add.Tensor, aten.sigmoid.default)
    assert (written.target, gated.target) == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_cell_whose_backward_torch_cannot_trace_goes_forward(dtype, monkeypatch):
    """``GRUCell``'s float64 CPU kernel decomposes into in-place ops on views: torch's
    functionalization asserts while tracing its backward, so reverse-last mode gives way
    to forward mode, through the cell's gates traced as plain ops (float32 takes another
    kernel, whose backward traces). The adjoint driver, which differentiates hod's own
    trace and takes this Hessian otherwise, is turned off to reach reverse-last."""
    monkeypatch.setattr(hod._adjoint, "_pays", lambda *args: False)
    torch.manual_seed(0)
    cell = nn.GRUCell(3, 4).double()
    h0, x = torch.rand(2, 4, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    expected = reference(lambda x: cell(x, h0).tanh().sum(), 2)(x)
    low = cell.to(dtype)
    fn = hod.hessian(lambda x: low(x, h0.to(dtype)).tanh().sum())
    assert (fn.lower(x.to(dtype)).mode == "forward") is (dtype == torch.float64)
    assert_same_tree(fn(x.to(dtype)), cast(expected, dtype), *TOLERANCES[dtype])
