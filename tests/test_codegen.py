"""The fast variant of generated code (hod._codegen, hod.passes.views): collapsed view chains and
numbers read from 0-dim tensors, run on plain tensors; the general code elsewhere."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import assert_same_tree, reference
from models import tanh_mlp, weighted_seed_mlp
from torch.utils._pytree import tree_flatten

import hod
import hod.passes.fuse
import hod.passes.memory
import hod.passes.views

D = torch.float64
ARGNUMS = (0, 1, 2, 3)


def _mlp_inputs(batch: int = 2, width: int = 4, dtype=D):
    return torch.rand(batch, width, dtype=dtype), *(
        torch.rand(width, width, dtype=dtype) for _ in range(3)
    )


def _count(module, name: str) -> int:
    return sum(
        1 for n in module.graph.nodes
        if n.op == "call_function" and getattr(n.target, "__name__", "") == name
    )


def _views(module) -> int:
    return sum(
        1 for n in module.graph.nodes
        if n.op == "call_function"
        and getattr(n.target, "__name__", "") in ("view", "permute", "slice", "expand", "movedim")
    )


@pytest.mark.parametrize("order", [2, 3])
def test_view_chains_become_single_calls(order):
    """Result blocks are slices of slices, permuted and viewed: in the fast code each is
    one ``as_strided``, with the layouts of the general code (same values, same strides),
    on the first call and on later ones."""
    args = _mlp_inputs()
    fn = hod.derivative(weighted_seed_mlp, order, ARGNUMS)
    lowered = fn.lower(*args)
    fast, general = lowered.planned_module, lowered.graph_module
    assert _count(fast, "as_strided") > 0
    assert _views(fast) + _count(fast, "as_strided") < _views(general)
    expected = general(*args)
    for _ in range(2):
        actual = tree_flatten(fn(*args))[0]
        assert [t.stride() for t in actual] == [t.stride() for t in expected]
        assert_same_tree(actual, list(expected), rtol=0, atol=0)
    assert_same_tree(actual, tree_flatten(reference(weighted_seed_mlp, order, ARGNUMS)(*args))[0])


def test_view_chains_of_planned_memory_are_collapsed(monkeypatch):
    """Planned tensors (results in slots, intermediates in the arena, concatenations
    written in place) are roots too; held results make the next call use fresh slots."""
    monkeypatch.setattr(hod.passes.memory, "MIN_PLANNED_BYTES", 0)
    args = _mlp_inputs(batch=3)
    fn = hod.derivative(weighted_seed_mlp, 3, ARGNUMS)
    lowered = fn.lower(*args)
    assert lowered.memory is not None and _count(lowered.planned_module, "as_strided") > 0
    other = _mlp_inputs(batch=3)
    first = fn(*args)
    second = fn(*other)  # ``first`` still held
    assert_same_tree(first, reference(weighted_seed_mlp, 3, ARGNUMS)(*args))
    assert_same_tree(second, reference(weighted_seed_mlp, 3, ARGNUMS)(*other))


def test_inputs_are_never_roots():
    """A chain from an input is left alone: its storage offset is the caller's."""
    x = torch.rand(2, 4, 4, dtype=D)

    def f(x):
        return torch.tanh(x.permute(2, 0, 1)[1:].reshape(-1)).sum()

    fn = hod.derivative(f, 2)
    inputs = [n for n in fn.lower(x).planned_module.graph.nodes if n.op == "placeholder"]
    for node in fn.lower(x).planned_module.graph.nodes:
        if getattr(node.target, "__name__", "") == "as_strided":
            assert node.args[0] not in inputs
    bigger = torch.rand(5, 2, 4, 4, dtype=D)[3]  # contiguous, with a storage offset
    assert_same_tree(fn(bigger), reference(f, 2)(bigger))


def test_layouts_are_observed_on_the_call(monkeypatch):
    """The rewrite takes the layouts that the code produced, not what meta tensors say:
    with the observation faked, the rewritten code is wrong (so the test can fail)."""
    args = _mlp_inputs()
    real = hod.passes.views._observe

    def at_the_start(*a):
        return [t.as_strided(t.shape, t.stride(), 0) for t in real(*a)]

    monkeypatch.setattr(hod.passes.views, "_observe", at_the_start)
    wrong = tree_flatten(hod.derivative(weighted_seed_mlp, 2, ARGNUMS)(*args))[0]
    monkeypatch.undo()
    right = tree_flatten(hod.derivative(weighted_seed_mlp, 2, ARGNUMS)(*args))[0]
    assert_same_tree(right, tree_flatten(reference(weighted_seed_mlp, 2, ARGNUMS)(*args))[0])
    assert not all(torch.equal(a, b) for a, b in zip(wrong, right, strict=True))


def test_calls_that_autograd_watches_run_the_general_code():
    """With inputs requiring grad, the fast code is not made at build and not run later;
    the results stay differentiable."""
    args = [a.requires_grad_() for a in _mlp_inputs()]
    fn = hod.hessian(weighted_seed_mlp, 1)
    lowered = fn.lower(*args)
    assert lowered.planned_module is None or _count(lowered.planned_module, "as_strided") == 0
    probe = torch.rand(4, 4, 4, 4, dtype=D)  # the plain sum is 0: softmax ignores shifts
    hessian = fn(*args)
    (gx,) = torch.autograd.grad((hessian * probe).sum(), args[1])
    expected = torch.func.jacrev(
        lambda w: (reference(weighted_seed_mlp, 2, 1)(args[0], w, *args[2:]) * probe).sum()
    )
    assert_same_tree(gx, expected(args[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numbers_are_read_from_0_dim_tensors(dtype):
    """``mul(x, 2)`` wraps 2 into a new tensor on every call; the fast code reads it from
    a 0-dim tensor of x's dtype instead, with the same bits as the general code."""
    args = (torch.rand(2, 3, dtype=dtype), torch.rand(3, 4, dtype=dtype),
            torch.rand(4, dtype=dtype), torch.rand(4, 2, dtype=dtype),
            torch.rand(2, dtype=dtype))
    fn = hod.derivative(tanh_mlp, 3, (0, 1))
    lowered = fn.lower(*args)
    fast = lowered.planned_module

    def numbers(module) -> int:
        return sum(
            1 for n in module.graph.nodes
            if n.op == "call_function"
            and getattr(n.target, "__name__", "") in ("mul", "add", "sub")
            and any(type(a) in (int, float) for a in n.args)
        )

    assert numbers(lowered.graph_module) > 0 and numbers(fast) == 0
    actual, expected = tree_flatten(fn(*args))[0], lowered.graph_module(*args)
    assert_same_tree(actual, list(expected), rtol=0, atol=0)


def test_numbers_stay_numbers_in_half_precision():
    """For float16 ATen computes ``x * c`` with ``c`` in float32: a float16 0-dim tensor
    would round ``c`` first, so the number stays."""
    x = torch.rand(3, dtype=torch.float16)
    fast = hod.derivative(lambda x: (x * 0.1).sin().sum(), 2).lower(x).planned_module
    assert fast is None or not any(
        n.op == "get_attr" and n.target.startswith("_number_") for n in fast.graph.nodes
    )


def _scaled_sums(x, w, d):
    """A mean over a product with a small factor plus a padded placement; and a product
    whose result is read twice, which must keep its own scaling."""
    y = x @ w
    t = (x @ w.T + torch.nn.functional.pad(torch.diag_embed(d), (0, 0, 1144, 0))) * 0.25
    return [t, y * 0.5, y]


def test_numbers_scale_the_small_tensors_a_product_is_made_from():
    """``(x @ w + pad(diag(d))) * 0.25`` becomes ``x @ (w * 0.25) + pad(diag(d * 0.25))``;
    ``y * 0.5`` with ``y`` read elsewhere stays."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from hod.passes.fold import fold_scalar_factors

    args = (torch.rand(1152, 8, dtype=D), torch.rand(8, 8, dtype=D), torch.rand(8, dtype=D))
    graph = make_fx(_scaled_sums)(*args).graph
    fold_scalar_factors(graph)
    graph.lint()
    scaled = [
        n.args[0] for n in graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.mul.Tensor
    ]
    sizes = sorted(n.meta["val"].numel() for n in scaled)
    assert sizes == [64, 64, 1152 * 8]  # w's transpose, diag(d); and y, read twice
    actual = torch.fx.GraphModule(torch.nn.Module(), graph)(*args)
    for got, expected in zip(actual, _scaled_sums(*args), strict=True):
        assert_same_tree(got, expected)


def _multiply_adds(x, y, m):
    """``a + b * c`` both ways round, ``a - b * c``, one whose product is read again, one
    whose ``c`` is a boolean mask (``addcmul`` would not promote it), and ``b * c - a``."""
    kept = x * y
    return [
        torch.tanh(x) + x * y.sin(), y.cos() * x + torch.exp(y), x.exp() - y * x.cos(),
        x.sin() + kept, kept * 2, y.tan() + x * m, y * x.sin() - x,
    ]


def test_a_product_read_once_by_a_sum_is_one_addcmul():
    from torch.fx.experimental.proxy_tensor import make_fx

    args = (torch.rand(4, 5, dtype=D), torch.rand(4, 5, dtype=D), torch.rand(4, 5) > 0.5)
    graph = make_fx(_multiply_adds)(*args).graph
    hod.passes.fuse.fuse_multiply_add(graph)
    graph.eliminate_dead_code()
    graph.lint()
    ops = [n.target for n in graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert ops.count(aten.addcmul.default) == 3
    values = [n.kwargs["value"] for n in graph.nodes if n.target is aten.addcmul.default]
    assert sorted(values) == [-1, 1, 1]
    assert ops.count(aten.mul.Tensor) == 4  # kept, kept * 2, x * m and y * x.sin()
    actual = torch.fx.GraphModule(torch.nn.Module(), graph)(*args)
    for got, expected in zip(actual, _multiply_adds(*args), strict=True):
        assert_same_tree(got, expected)


def test_a_product_added_to_itself_stays_a_sum():
    """``p + p`` reads the product twice: no ``addcmul`` (it would erase ``p`` while the
    sum still reads it, as the adjoint driver's terms summed with themselves did)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def doubled(x, y):
        p = x * y.sin()
        return [p + p]

    args = (torch.rand(4, 5, dtype=D), torch.rand(4, 5, dtype=D))
    graph = make_fx(doubled)(*args).graph
    hod.passes.fuse.fuse_multiply_add(graph)
    graph.lint()
    ops = [n.target for n in graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.addcmul.default not in ops
    actual = torch.fx.GraphModule(torch.nn.Module(), graph)(*args)
    assert_same_tree(actual, doubled(*args))


def _expanded_products(d, t):
    """Products of tangents expanded over a batch: a chain of three (made once and expanded
    again), one whose product fills the batch anyway (kept), and one read by a view (kept:
    an expanded result has no view)."""
    e1, e2 = d.view(2, 1, 1, 6).expand(2, 1, 5, 6), d.view(1, 2, 1, 6).expand(1, 2, 5, 6)
    e3 = d.view(2, 1, 1, 1, 6).expand(2, 1, 1, 5, 6)
    chain = t * (e1 * e2 * e3)
    full = d.view(2, 1, 6).expand(2, 5, 6) * t.expand(2, 5, 6)
    viewed = (e1 * e2).view(2, 2, 30)
    return [chain, full + 1, viewed]


def test_products_of_expanded_tangents_run_before_the_expansion():
    from torch.fx.experimental.proxy_tensor import make_fx

    args = (torch.rand(2, 6, dtype=D), torch.rand(5, 6, dtype=D))
    graph = make_fx(_expanded_products)(*args).graph
    hod.passes.fuse.products_before_expands(graph)
    graph.eliminate_dead_code()
    graph.lint()
    aten = torch.ops.aten
    sizes = [n.meta["val"].numel() for n in graph.nodes if n.target is aten.mul.Tensor]
    # (2, 2, 1, 6) and (2, 2, 2, 1, 6) made once; t * chain, full and viewed in full
    assert sorted(sizes) == [24, 48, 60, 120, 240]
    actual = torch.fx.GraphModule(torch.nn.Module(), graph)(*args)
    for got, expected in zip(actual, _expanded_products(*args), strict=True):
        assert_same_tree(got, expected)


def _powers(x):
    return [x ** 4, x ** 7, x ** 16, x ** 3, x ** 2.5, x ** 17]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_integer_powers_are_products_by_squaring(dtype):
    """``x ** n`` for 4 <= n <= 16 as muls (4: two, 7: four, 16: four); 3, 2.5 and 17 keep
    torch's kernel. The values agree with the kernel's to a few units in the last place."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.rand(50, dtype=dtype) + 0.5
    graph = make_fx(_powers)(x).graph
    hod.passes.fuse.integer_powers_as_products(graph)
    graph.eliminate_dead_code()
    graph.lint()
    aten = torch.ops.aten
    ops = [n.target for n in graph.nodes if n.op == "call_function"]
    assert ops.count(aten.mul.Tensor) == 2 + 4 + 4 and ops.count(aten.pow.Tensor_Scalar) == 3
    actual = torch.fx.GraphModule(torch.nn.Module(), graph)(x)
    rtol = 1e-14 if dtype == torch.float64 else 1e-6
    for got, expected in zip(actual, _powers(x), strict=True):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=0)


def _outer_products(a, b, c, stacked, w):
    """Products meeting over one index: ``mm``, ``bmm`` and ``matmul``, one read through a
    view splitting its rows and a transpose (placed in that layout), one read twice, one
    whose row view is read again, and a product over two indices (kept)."""
    placed = (a @ b).view(3, 4, 5).transpose(-1, -2)
    kept = a @ b
    viewed = (c @ b).view(2, 2, 5)
    return [placed + 1, kept.sum(), kept * 2, viewed.transpose(1, 2), viewed.sum(),
            torch.bmm(stacked, stacked.transpose(1, 2)), torch.matmul(stacked, b), a @ w]


def test_products_over_one_index_are_broadcast_multiplications():
    from torch.fx.experimental.proxy_tensor import make_fx

    args = (torch.rand(12, 1, dtype=D), torch.rand(1, 5, dtype=D), torch.rand(4, 1, dtype=D),
            torch.rand(3, 4, 1, dtype=D), torch.rand(1, 2, dtype=D))
    graph = make_fx(_outer_products)(*args).graph
    hod.passes.fuse.outer_products_as_mul(graph)
    graph.eliminate_dead_code()
    graph.lint()
    aten = torch.ops.aten
    ops = [n.target for n in graph.nodes if n.op == "call_function"]
    assert not {aten.mm.default, aten.bmm.default, aten.matmul.default} & set(ops)
    placed = next(n for n in graph.nodes if n.target is aten.add.Tensor).args[0]
    assert placed.target is aten.mul.Tensor and placed.meta["val"].is_contiguous()
    assert ops.count(aten.transpose.int) == 2  # the stacked bmm's operand, viewed's reader
    actual = torch.fx.GraphModule(torch.nn.Module(), graph)(*args)
    for got, expected in zip(actual, _outer_products(*args), strict=True):
        assert_same_tree(got, expected)


def _step_sums(hs, ds, extra):
    """A weight's gradient summed over steps (``h_t^T d_t``, transposed through two
    permutes as torch's backward writes it), a transposed sum, a short sum and another term."""
    grad = hs[0].permute(1, 0) @ ds[0]
    for h, d in zip(hs[1:], ds[1:], strict=True):
        grad = grad + (h.permute(1, 0) @ d).T.T
    flipped = (ds[0].T @ hs[0]).T + (ds[1].T @ hs[1]).T + (ds[2].T @ hs[2]).T + extra
    return [grad, flipped, hs[0].T @ ds[0] + hs[1].T @ ds[1]]


def test_a_sum_of_products_is_one_product_of_concatenated_operands():
    from torch.fx.experimental.proxy_tensor import make_fx

    from hod._product_sums import gather_product_sums

    hs, ds = torch.rand(5, 2, 4, dtype=D), torch.rand(5, 2, 3, dtype=D)
    extra = torch.rand(4, 3, dtype=D)
    gm = make_fx(lambda hs, ds, extra: _step_sums(list(hs), list(ds), extra))(hs, ds, extra)
    gather_product_sums(gm)
    gm.graph.lint()
    products = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert len(products) == 4  # grad, flipped: one each; the two-term sum: left alone
    assert sorted(n.args[0].meta["val"].shape[1] for n in products) == [2, 2, 6, 10]
    stacked = [n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default
               and n.args[1] == 0 and n.meta["val"].shape == (10, 4)]
    assert stacked  # the transposed step blocks, stacked as rows
    assert_same_tree(gm(hs, ds, extra), _step_sums(list(hs), list(ds), extra))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_softmax_derives_with_one_sum_per_order(order):
    """Each order of softmax sums its derivatives along the softmax dim once, and nothing
    else is summed (logsumexp's tower summed the exponentials and each of their orders)."""

    def f(x, w):
        return torch.softmax(torch.tanh(x @ w), dim=-1)

    args = (torch.rand(3, 4, dtype=D), torch.rand(4, 4, dtype=D))
    fn = hod.derivative(f, order, (0, 1))
    graph = fn.lower(*args).graph_module.graph
    sums = [n for n in graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.sum.dim_IntList, torch.sum, torch.ops.aten.mv.default, torch.mv)]
    assert len(sums) == order
    assert_same_tree(fn(*args), reference(f, order, (0, 1))(*args))


def _deep_tanh(x, w1, w2):
    # x is scaled first: a layer that reads an input itself would be split off (hod._split)
    return torch.tanh(torch.tanh((2 * x) @ w1) @ w2).sum()


def _symmetrizations(graph) -> list[int]:
    """Entries summed by each ``t + t^T`` over the first two axes in ``graph``."""
    def named(node, name):
        return node.op == "call_function" and getattr(node.target, "__name__", "") == name

    sizes = []
    for node in graph.nodes:
        if not named(node, "add") or len(node.args) != 2:
            continue
        t, other = node.args
        if (
            isinstance(other, torch.fx.Node) and named(other, "permute")
            and other.args[0] is t and list(other.args[1][:2]) == [1, 0]
        ):
            sizes.append(node.meta["val"].numel())
    return sizes


def test_pairs_are_symmetrized_before_their_products():
    """Order 3 with the weights, width 8: the first layer's weight derivative is a product
    of ``(S, S, 4, 8)`` entries into ``(S, S, 8, 8)``; it is symmetrized on the smaller
    side, and computed without the Kronecker product (as a permuted view)."""
    x, w1, w2 = torch.rand(4, 8, dtype=D), torch.rand(8, 8, dtype=D), torch.rand(8, 8, dtype=D)
    fn = hod.derivative(_deep_tanh, 3, (0, 1, 2))
    lowered = fn.lower(x, w1, w2)
    graph = lowered.graph_module.graph
    assert not any(n.target is torch.ops.aten.kron.default for n in graph.nodes)
    seeds = 8 + 64 + 64  # x's per-example seeds, then w1's and w2's
    assert max(_symmetrizations(graph)) <= seeds * seeds * 4 * 8
    expected = reference(_deep_tanh, 3, (0, 1, 2))(x, w1, w2)
    assert_same_tree(fn(x, w1, w2), expected)
    with torch.enable_grad():  # the general code: the same values
        assert_same_tree(fn(x, w1, w2.requires_grad_()), expected)


def _scaled_square(x):
    v = x.expand(32, 2, 4)
    return [(v * v) * 0.5]


def test_a_number_is_not_folded_into_both_factors_of_a_square():
    """``(v * v) * c`` must not become ``(v * c) * (v * c)``: the factor stays when the
    product's two factors are one node."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from hod.passes.fold import fold_scalar_factors

    x = torch.rand(2, 1, dtype=D)
    graph = make_fx(_scaled_square)(x).graph
    fold_scalar_factors(graph)
    graph.lint()
    (got,) = torch.fx.GraphModule(torch.nn.Module(), graph)(x)
    assert_same_tree(got, _scaled_square(x)[0])


@pytest.mark.parametrize("tree", [
    ((1, 2), (3, (4, 5)), 6), 7, (), ((),), (8,),
    {"a": 1, "b": (2, 3)}, [1, (2, 3)], (torch.return_types.max((1, 2)), 3),
    functools.reduce(lambda t, _: (t,), range(300), 1),  # deeper than eval parses
])
def test_results_are_nested_as_tree_unflatten_nests_them(tree):
    """Tuples are built by one generated expression, other structures by tree_unflatten:
    the same structure and the very same leaves either way."""
    from torch.utils._pytree import tree_unflatten

    from hod._assemble import unflattener

    leaves, spec = tree_flatten(tree)
    leaves = [object() for _ in leaves]  # identity, not equality, is checked
    built, expected = unflattener(spec)(leaves), tree_unflatten(leaves, spec)
    assert tree_flatten(built)[1] == spec and type(built) is type(expected)
    assert all(a is b for a, b in zip(tree_flatten(built)[0], leaves, strict=True))


def _twin_calls():
    """One call of each ATen overload in ``FAST_TWINS``: ``(args, kwargs)``."""
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.rand(2, 3, generator=g, dtype=D) + 0.5 for _ in range(3))
    m, s = torch.rand(3, 3, generator=g, dtype=D), torch.rand(2, 3, 3, generator=g, dtype=D)
    u = torch.rand(1, 3, 1, generator=g, dtype=D)
    a = torch.ops.aten
    return {
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
        a.movedim.int: ((s, 0, 2), {}), a.eye.default: ((3,), {"dtype": D}),
        a.addcmul.default: ((x, y, z), {"value": 0.5}),
        a.addmm.default: ((m, m, m), {"beta": 2, "alpha": 0.5}),
        a.clone.default: ((m.T,), {"memory_format": torch.contiguous_format}),
        a.split_with_sizes.default: ((m, [1, 2], 1), {}), a.squeeze.dims: ((u, [0, 2]), {}),
        a.squeeze.dim: ((u, 0), {}), a.unsqueeze.default: ((x, 1), {}),
        a.select.int: ((m, 1, 2), {}), a.transpose.int: ((s, 0, 2), {}), a.t.default: ((m,), {}),
        a.mul.Scalar: ((x, 3.0), {}), a.pow.Tensor_Scalar: ((x, 3), {}),
        a.sqrt.default: ((x,), {}), a.rsqrt.default: ((x,), {}), a.abs.default: ((x - 1,), {}),
        a.ge.Scalar: ((x, 1.0), {}), a.lt.Scalar: ((x, 1.0), {}),
    }


def test_fast_twins_compute_what_their_overloads_do():
    """Each public function the generated code calls instead of an ATen overload returns
    the same tensors (values, shapes, strides) for the same arguments."""
    from hod._codegen import FAST_TWINS

    calls = _twin_calls()
    assert set(FAST_TWINS) == set(calls)
    for op, (args, kwargs) in calls.items():
        expected, actual = op(*args, **kwargs), FAST_TWINS[op](*args, **kwargs)
        for e, a in zip(*(torch.utils._pytree.tree_leaves(t) for t in (expected, actual)),
                        strict=True):
            assert torch.equal(e, a) and e.stride() == a.stride(), op


def _logistic_loss(w, data, labels):
    return torch.nn.functional.binary_cross_entropy_with_logits(data @ w, labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_value_read_for_its_shape_alone_is_not_computed(dtype):
    """The backward pass's ``ones_like(loss)`` is a fill of the loss's shape: a Hessian's
    code computes no ``log`` (the loss's alone; its gradient has none), ``derivatives``'
    code does, and both equal torch.func's."""
    torch.manual_seed(0)
    args = (torch.randn(5, dtype=dtype), torch.randn(8, 5, dtype=dtype),
            torch.rand(8, dtype=dtype).round())
    hessian = hod.hessian(_logistic_loss)
    code = hessian.lower(*args).code
    assert "full_like" not in code and "torch.log(" not in code
    assert "torch.log(" in hod.derivatives(_logistic_loss, 2).lower(*args).code
    tolerance = {} if dtype == D else {"rtol": 1e-4, "atol": 1e-6}
    expected = reference(_logistic_loss, 2)(*[a.double() for a in args])
    assert_same_tree(hessian(*args), expected.to(dtype), **tolerance)
    value, gradient, second = hod.derivatives(_logistic_loss, 2)(*args)
    assert_same_tree(value, _logistic_loss(*args), **tolerance)
    assert_same_tree(second, expected.to(dtype), **tolerance)
