"""``compile=``: the generated code run through torch.compile, and when it is not."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_same_tree, reference
from models import seed_mlp, tanh_mlp, weighted_seed_mlp

import hod
import hod._split
from hod._compiled import with_realized_outputs
from hod._emitter import REALIZE


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts compilations."""

    def __init__(self) -> None:
        self.compilations = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.compilations += 1
        return gm.forward


def _mlp_inputs(batch: int = 3, width: int = 4, depth: int = 2):
    x = torch.rand(batch, width, dtype=torch.float64)
    return x, *(torch.rand(width, width, dtype=torch.float64) for _ in range(depth))


@pytest.mark.parametrize("order", [2, 3, 4])
def test_compiled_code_equals_torch_func_order_by_order(order):
    args = _mlp_inputs(batch=2, depth=2)
    backend = CountingBackend()
    argnums = (0, 1, 2)
    fn = hod.derivative(weighted_seed_mlp, order, argnums, compile={"backend": backend})
    expected = reference(weighted_seed_mlp, order, argnums)(*args)
    assert_same_tree(fn(*args), expected)
    assert_same_tree(fn(*args), expected)  # the second call reuses the compiled code
    assert backend.compilations == 1
    assert fn.lower(*args).compiled is not None


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_inductor_compiles_a_hessian_with_parameters():
    x, W1, W2 = torch.rand(2, 3), torch.rand(3, 3), torch.rand(3, 1)
    b1, b2 = torch.rand(3), torch.rand(1)
    args = (x, W1, b1, W2, b2)
    fn = hod.hessian(tanh_mlp, (0, 1), compile=True)
    expected = reference(tanh_mlp, 2, (0, 1))(*args)
    assert_same_tree(fn(*args), expected, rtol=1e-5, atol=1e-6)


def test_derivatives_jacobian_and_vector_outputs_compile():
    backend = CountingBackend()
    x = torch.rand(5, dtype=torch.float64)

    def f(x):
        return torch.sin(x) * x.exp()

    values = hod.derivatives(f, 3, compile={"backend": backend})(x)
    for k in range(1, 4):
        assert_same_tree(values[k], reference(f, k)(x))
    assert_same_tree(hod.jacobian(f, compile={"backend": backend})(x), reference(f, 1)(x))
    assert backend.compilations == 2


def test_vmap_compiles_the_batched_code_and_autograd_runs_the_eager_code():
    """Under vmap the batched code runs on plain tensors (hod._vmap), so it is compiled;
    under autograd the eager code runs."""
    backend = CountingBackend()
    fn = hod.hessian(weighted_seed_mlp, 1, compile={"backend": backend})
    x, W = _mlp_inputs(depth=1)
    batched = torch.rand(4, *W.shape, dtype=torch.float64)

    per_sample = torch.func.vmap(lambda w: fn(x, w))(batched)
    expected = torch.stack([reference(weighted_seed_mlp, 2, 1)(x, w) for w in batched])
    assert_same_tree(per_sample, expected)
    assert backend.compilations == 1

    probe = torch.rand(*W.shape, *W.shape, dtype=torch.float64)  # softmax's shifts sum to 0
    W.requires_grad_()
    (fn(x, W) * probe).sum().backward()  # autograd reaches W through the eager code
    W_ = W.detach().requires_grad_()
    (reference(weighted_seed_mlp, 2, 1)(x, W_) * probe).sum().backward()
    assert_same_tree(W.grad, W_.grad)
    assert backend.compilations == 1


def test_in_place_updates_of_captured_tensors_show_in_compiled_results():
    W = torch.rand(4, 4, dtype=torch.float64)

    def f(x):
        return torch.tanh(x @ W).sum()

    fn = hod.hessian(f, compile={"backend": CountingBackend()})
    x = torch.rand(3, 4, dtype=torch.float64)
    fn(x)
    W.mul_(2)
    assert_same_tree(fn(x), reference(f, 2)(x))


@pytest.mark.parametrize("bad", [1, "yes", {"fullgraph": False}, {"mode": "default", "x": 1}])
def test_compile_argument_must_be_a_flag_or_torch_compile_keywords(bad):
    with pytest.raises(hod.InputError, match=r"compile must be True, False or a dict"):
        hod.derivative(seed_mlp, 2, compile=bad)


def test_a_failing_compiler_raises_compile_error_naming_the_cause():
    def broken(gm, example_inputs):
        raise ValueError("no code for you")

    fn = hod.hessian(seed_mlp, compile={"backend": broken})
    with pytest.raises(hod.CompileError, match=r"hod.hessian\(seed_mlp\).*ValueError: no code"):
        fn(*_mlp_inputs(depth=1))


def test_symmetrized_derivatives_are_extra_outputs_of_the_compiled_graph():
    """Computed into memory once, not inlined into the mostly-zero blocks that read them."""
    args = _mlp_inputs(batch=4, depth=2)
    lowered = hod.derivative(weighted_seed_mlp, 4, 0).lower(*args)
    module, n_results = with_realized_outputs(lowered.graph_module)
    outputs = next(n for n in module.graph.nodes if n.op == "output").args[0]
    original = next(n for n in lowered.graph_module.graph.nodes if n.op == "output").args[0]
    assert n_results == len(original) < len(outputs)
    assert all(n.meta.get(REALIZE) for n in outputs[n_results:])
    results = module(*args)[:n_results]
    assert_same_tree(results, lowered.graph_module(*args))
    assert_same_tree(results, [reference(weighted_seed_mlp, 4, 0)(*args)])


@pytest.mark.parametrize("order", [2, 3])
def test_a_split_first_layer_compiles(monkeypatch, order):
    """g's code with the composition after it is one compiled graph."""
    monkeypatch.setattr(hod._split, "SPLIT_MIN_ENTRIES", 0)
    monkeypatch.setattr(hod._split, "SPLIT_MIN_ENTRIES_HESSIAN", 0)
    args = _mlp_inputs(batch=2, depth=2)
    backend = CountingBackend()
    fn = hod.derivative(weighted_seed_mlp, order, (0, 1, 2), compile={"backend": backend})
    lowered = fn.lower(*args)
    assert lowered.first_layer is not None and lowered.compiled is not None
    assert_same_tree(fn(*args), reference(weighted_seed_mlp, order, (0, 1, 2))(*args))
    assert backend.compilations == 1
