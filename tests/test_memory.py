"""Reused memory (hod.passes.memory): the planned code, when it runs, and what it must not do."""

from __future__ import annotations

import math
import operator
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_same_tree, reference
from models import weighted_seed_mlp
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_map

import hod
import hod._split
import hod.passes.memory
from hod.passes.memory import plan


@pytest.fixture
def everything_planned(monkeypatch):
    monkeypatch.setattr(hod.passes.memory, "MIN_PLANNED_BYTES", 0)


def _inputs(width: int = 6, batch: int = 4, dtype=torch.float64):
    x = torch.rand(batch, width, dtype=dtype)
    return x, *(torch.rand(width, width, dtype=dtype) for _ in range(3))


ARGNUMS = (0, 1, 2, 3)


def test_a_wide_hessian_runs_the_planned_code():
    args = _inputs(width=24, batch=10)
    fn = hod.hessian(weighted_seed_mlp, ARGNUMS)
    lowered = fn.lower(*args)
    assert lowered.memory is not None and lowered.memory.slots
    assert_same_tree(fn(*args), reference(weighted_seed_mlp, 2, ARGNUMS)(*args))
    assert lowered.memory._arena is not None  # the arena was made: the planned code ran


def tanh_net(x, w1, w2, w3):
    return torch.tanh(torch.tanh(torch.tanh(x @ w1) @ w2) @ w3).pow(2).sum()


def _tanh_inputs(dtype=torch.float64):
    return torch.rand(3, 4, dtype=dtype), *(torch.randn(4, 4, dtype=dtype) for _ in range(3))


@dataclass(frozen=True)
class Signature:
    """A transformed function whose results are held across calls: ``make()`` builds it,
    ``inputs()`` gives new arguments, ``reference(*args)`` what it must return, ``split``
    whether its first layer is split off (hod._split)."""

    name: str
    make: Callable[[], hod.DerivativeFunction]
    inputs: Callable[[], tuple]
    reference: Callable
    split: bool = False


def _every_order(f, order, argnums):
    return lambda *args: (f(*args), *(reference(f, k, argnums)(*args)
                                      for k in range(1, order + 1)))


SIGNATURES = [
    Signature("hessian-with-weights", lambda: hod.hessian(weighted_seed_mlp, ARGNUMS), _inputs,
              reference(weighted_seed_mlp, 2, ARGNUMS)),
    Signature("order-3", lambda: hod.derivative(tanh_net, 3, (0, 2)), _tanh_inputs,
              reference(tanh_net, 3, (0, 2))),
    Signature("derivatives", lambda: hod.derivatives(tanh_net, 2, (0, 2)), _tanh_inputs,
              _every_order(tanh_net, 2, (0, 2))),
    Signature("tuple-argnums", lambda: hod.hessian(tanh_net, (3, 0)), _tanh_inputs,
              reference(tanh_net, 2, (3, 0))),
    Signature("split-hessian", lambda: hod.hessian(tanh_net, ARGNUMS), _tanh_inputs,
              reference(tanh_net, 2, ARGNUMS), split=True),
    Signature("split-order-3", lambda: hod.derivative(tanh_net, 3, (0, 1)), _tanh_inputs,
              reference(tanh_net, 3, (0, 1)), split=True),
]


@pytest.fixture(params=SIGNATURES, ids=lambda s: s.name)
def signature(request, monkeypatch, everything_planned) -> Signature:
    """A signature, with the first layer split off exactly when it says so."""
    sig = request.param
    threshold = 0 if sig.split else 2**62
    monkeypatch.setattr(hod._split, "SPLIT_MIN_ENTRIES", threshold)
    monkeypatch.setattr(hod._split, "SPLIT_MIN_ENTRIES_HESSIAN", threshold)
    return sig


def _planned(sig: Signature) -> hod.DerivativeFunction:
    """``sig``'s function, checked to write its results into slots (the path under test)."""
    fn = sig.make()
    lowered = fn.lower(*sig.inputs())
    assert lowered.memory is not None and lowered.memory.slots
    assert (lowered.first_layer is not None) == sig.split
    return fn


def _copy(tree):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def _check_held_results(sig: Signature, fn, calls: int = 3) -> None:
    """Calls ``fn`` on new inputs while every earlier result is held: each result keeps
    the values it had when it was returned (bit for bit), and those were right."""
    held = []
    for _ in range(calls):
        args = sig.inputs()
        result = fn(*args)
        held.append((args, result, _copy(result)))
    for args, result, taken in held:
        assert_same_tree(result, taken, rtol=0, atol=0)
        assert_same_tree(taken, sig.reference(*args))


def test_held_results_keep_their_values(signature):
    _check_held_results(signature, _planned(signature))


def test_the_held_results_check_sees_an_overwrite(signature, monkeypatch):
    """With slots that never get fresh memory (their reference count ignored), the next
    call writes over held results, and the check above fails: it is not vacuous."""
    never_held = types.SimpleNamespace(getrefcount=lambda obj: 2, platform=sys.platform)
    monkeypatch.setattr(hod.passes.memory, "sys", never_held)
    with pytest.raises(AssertionError):
        _check_held_results(signature, _planned(signature))


def test_a_view_of_a_held_result_keeps_its_values(signature):
    """Only a slice of one result is kept (the result itself dropped): its memory is
    still the caller's."""
    fn = _planned(signature)
    first = tree_flatten(fn(*signature.inputs()))[0]
    piece = first[-1][1:]
    taken = piece.clone()
    del first
    for _ in range(2):
        args = signature.inputs()
        assert_same_tree(fn(*args), signature.reference(*args))
    assert_same_tree(piece, taken, rtol=0, atol=0)


def test_dropped_results_give_their_memory_to_the_next_call(signature, monkeypatch):
    """Results dropped before the next call let it write into the same memory (no fresh
    mapping), and its results are right; held ones make it map fresh memory."""
    fn = _planned(signature)
    mapped = []
    real = hod.passes.memory._mapped
    monkeypatch.setattr(hod.passes.memory, "_mapped", lambda n: mapped.append(n) or real(n))
    fn(*signature.inputs())  # maps the arena and the slots on the first planned call
    mapped.clear()
    for _ in range(3):
        args = signature.inputs()
        assert_same_tree(fn(*args), signature.reference(*args))  # dropped once checked
    assert mapped == []
    kept = fn(*signature.inputs())
    fn(*signature.inputs())
    assert mapped and kept is not None


def test_results_held_by_one_thread_while_others_call(signature):
    """A thread holds its result while two others call the function with other inputs;
    every thread's results are right, and the held one is unchanged. (References are
    computed up front: torch.func's forward AD levels are not thread-safe.)"""
    fn = _planned(signature)
    holding, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def expected_calls(n: int) -> list[tuple]:
        return [(args, signature.reference(*args))
                for args in (signature.inputs() for _ in range(n))]

    def reporting(work, *args):
        def run():
            try:
                work(*args)
            except BaseException as error:  # re-raised by the main thread
                errors.append(error)
            finally:
                holding.set()
        return run

    def hold(args, expected):
        result = fn(*args)
        taken = _copy(result)
        holding.set()
        assert done.wait(timeout=120)
        assert_same_tree(result, taken, rtol=0, atol=0)
        assert_same_tree(taken, expected)

    def call(calls):
        assert holding.wait(timeout=120)
        for args, expected in calls:
            assert_same_tree(fn(*args), expected)

    holder = threading.Thread(target=reporting(hold, *expected_calls(1)[0]))
    callers = [threading.Thread(target=reporting(call, expected_calls(4))) for _ in range(2)]
    for t in (holder, *callers):
        t.start()
    for t in callers:
        t.join()
    done.set()
    holder.join()
    if errors:
        raise errors[0]


def _chain(x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """Intermediates with overlapping and disjoint lifetimes, and two escaping ones."""
    a = torch.tanh(x @ w)
    b = a * x
    c = torch.exp(b) + a
    d = (c @ w).sin()
    e = d * b + c
    return [e @ w, torch.cos(e)[1:]]


def test_arena_buffers_alive_together_never_overlap(everything_planned):
    graph = make_fx(_chain)(torch.rand(8, 8), torch.rand(8, 8)).graph
    planned, memory = plan(graph)
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    end, escaped = hod.passes.memory._lifetimes(nodes, index)
    inner = [n for n in nodes if n in end and n not in escaped and n.target is not operator.getitem]
    assert len(memory.arena_layout) == len(inner) >= 6 and len(memory.slots) == 2
    for (off_a, shape_a, _), a in zip(memory.arena_layout, inner, strict=True):
        for (off_b, shape_b, _), b in zip(memory.arena_layout, inner, strict=True):
            if a is b or index[a] > end[b] or index[b] > end[a]:
                continue  # not alive at the same time
            stop_a, stop_b = off_a + 4 * math.prod(shape_a), off_b + 4 * math.prod(shape_b)
            assert stop_a <= off_b or stop_b <= off_a, (a, b)
    x, w = torch.rand(8, 8), torch.rand(8, 8)
    module = torch.fx.GraphModule(torch.nn.Module(), planned)
    for actual, expected in zip(module(x, w, *memory.tensors()), _chain(x, w), strict=True):
        assert_same_tree(actual, expected)


def test_gradients_through_the_result_use_the_plain_code(everything_planned):
    args = [t.requires_grad_() for t in _inputs()]
    hess = hod.hessian(weighted_seed_mlp, 0)(*args)
    assert hess.grad_fn is not None
    (g,) = torch.autograd.grad(hess.sum(), args[1])
    expected = torch.func.grad(
        lambda p: torch.func.hessian(weighted_seed_mlp)(args[0], p, *args[2:]).sum()
    )(args[1].detach())
    assert_same_tree(g, expected)


def test_vmap_uses_the_plain_code(everything_planned):
    fn = hod.derivative(lambda x, w: torch.tanh(x @ w).sum(), 2)
    xs, w = torch.rand(3, 5, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)
    batched = torch.func.vmap(fn, in_dims=(0, None))(xs, w)
    for x, h in zip(xs, batched, strict=True):
        assert_same_tree(h, reference(lambda x, w: torch.tanh(x @ w).sum(), 2)(x, w))


def test_inference_mode_and_back(everything_planned):
    fn = hod.hessian(weighted_seed_mlp, ARGNUMS)
    args = _inputs()
    with torch.inference_mode():
        inside = fn(*args)
    outside = fn(*args)
    expected = reference(weighted_seed_mlp, 2, ARGNUMS)(*args)
    assert_same_tree(inside, expected)
    assert_same_tree(outside, expected)


def test_concurrent_calls_from_threads(everything_planned):
    fn = hod.hessian(weighted_seed_mlp, ARGNUMS)
    calls = [_inputs() for _ in range(8)]
    results: list = [None] * len(calls)

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = fn(*calls[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for args, result in zip(calls, results, strict=True):
        assert_same_tree(result, reference(weighted_seed_mlp, 2, ARGNUMS)(*args))


def test_small_functions_plan_nothing():
    graph = hod.hessian(weighted_seed_mlp, ARGNUMS).lower(*_inputs()).graph_module.graph
    assert plan(graph) is None


def test_concatenations_are_written_in_place(everything_planned):
    """Seed-span pieces are computed into slices of their concatenation (forward pass) or
    added into the slice of the dense product they belong to (backward pass)."""
    args = _inputs()
    fn = hod.hessian(weighted_seed_mlp, ARGNUMS)
    lowered = fn.lower(*args)

    def cats(module):  # that allocate (the planned code's cat.out is called as torch.cat)
        return sum(n.target in (torch.ops.aten.cat.default, torch.cat) and "out" not in n.kwargs
                   for n in module.graph.nodes)

    assert cats(lowered.graph_module) >= 5
    assert cats(lowered.planned_module) == 0
    in_place = [
        n for n in lowered.planned_module.graph.nodes
        if n.target is torch.add and n.kwargs.get("out") in n.args  # add.out, as torch.add
    ]
    # One per layer whose backward product carries weight seeds: the last two. The first
    # layer's carries only x's seeds (the x-weight blocks come from per-example terms).
    assert len(in_place) == 2
    assert_same_tree(fn(*args), reference(weighted_seed_mlp, 2, ARGNUMS)(*args))


def test_gradients_into_captured_weights_use_the_plain_code(everything_planned):
    """A captured tensor that requires grad makes the results require grad too: the
    planned code (whose ``out=`` forms autograd refuses) must not run."""
    w = torch.rand(6, 6, dtype=torch.float64, requires_grad=True)
    x = torch.rand(4, 6, dtype=torch.float64)

    def f(x):
        return torch.tanh(x @ w).sum()

    hess = hod.hessian(f)(x)
    (g,) = torch.autograd.grad(hess.sum(), w)

    def reference_sum(w):
        return torch.func.hessian(lambda x: torch.tanh(x @ w).sum())(x).sum()

    assert_same_tree(g, torch.func.grad(reference_sum)(w.detach()))


def _padded_sums(x: torch.Tensor, d: torch.Tensor) -> list[torch.Tensor]:
    """``A + pad(D)`` with A fresh, ``pad(D) + A`` with A a view of a fresh product,
    ``A - pad(D)``; and one where A is read again (must stay out of place)."""
    pad = torch.nn.functional.pad
    a = torch.tanh(x)
    b = (x @ x.T).view(2, 4, 8)
    c = torch.exp(x)
    kept = torch.sin(x)
    return [
        a + pad(d, (2, 2, 1, 3)), pad(d.view(2, 2, 4), (2, 2, 1, 1)) + b,
        c - pad(d, (4, 0, 0, 4)), kept + pad(d, (1, 3, 3, 1)), kept * 2,
    ]


def test_padded_terms_are_added_into_their_window(everything_planned):
    """A padded derivative added to a fresh tensor is added into the window it covers:
    no padding, no full-size sum, the same values."""
    x, d = torch.rand(8, 8, dtype=torch.float64), torch.rand(4, 4, dtype=torch.float64)
    graph = make_fx(_padded_sums)(x, d).graph
    planned, memory = plan(graph)
    ops = [n.target for n in planned.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert sum("pad" in getattr(op, "__name__", str(op)) for op in ops) == 1  # the kept one
    windows = [
        n for n in planned.nodes if n.target in (aten.add.out, aten.sub.out)
        and n.kwargs["out"] is n.args[0]
    ]
    assert len(windows) == 3
    module = torch.fx.GraphModule(torch.nn.Module(), planned)
    actual = module(x, d, *memory.tensors())
    for got, expected in zip(actual, _padded_sums(x, d), strict=True):
        assert_same_tree(got, expected)


def _spread_twice(x: torch.Tensor, s: torch.Tensor) -> list[torch.Tensor]:
    """A large tensor made by spreading a column (a clone of an expand), read by a product."""
    spread = x[:, :1].expand(-1, 64).clone(memory_format=torch.contiguous_format)
    return [spread * s, spread.sum()]


def test_clones_are_written_into_planned_memory(everything_planned):
    """A fresh large clone faults its pages in on some calls (0.9 ms against 0.15 ms for
    2.4 MB, in processes whose allocator hands memory back): it is planned like the rest."""
    args = (torch.rand(32, 64, dtype=torch.float64), torch.rand(64, dtype=torch.float64))
    graph = make_fx(_spread_twice)(*args).graph
    planned, memory = plan(graph)
    clones = [n for n in planned.nodes if "clone" in getattr(n.target, "__name__", "")]
    assert len(clones) == 1 and "out" in clones[0].kwargs
    module = torch.fx.GraphModule(torch.nn.Module(), planned)
    for got, expected in zip(module(*args, *memory.tensors()), _spread_twice(*args), strict=True):
        assert_same_tree(got, expected)


def test_a_seed_identity_is_written_into_planned_memory(everything_planned):
    """The identity a Hessian's seeds are made of is written into reused memory, called
    twice (the second call finds the memory holding the first call's identity and its
    products: it must zero it again)."""
    x = torch.rand(5, 4, dtype=torch.float64)
    fn = hod.hessian(lambda x: torch.tanh(x).pow(3).sum())
    planned = fn.lower(x).planned_module
    eyes = [n for n in planned.graph.nodes if "eye" in getattr(n.target, "__name__", "")]
    assert eyes and all("out" in n.kwargs for n in eyes)
    for _ in range(2):
        assert_same_tree(fn(x), torch.func.hessian(lambda x: torch.tanh(x).pow(3).sum())(x))
