"""``sparse=True``: sparse Jacobians and Hessians (``hod._sparse``).

Each result block is a torch sparse tensor whose ``to_dense()`` equals torch.func's dense
block (float64 and float32), with exactly the structural nonzeros of the functions here
(stencils, chained and banded functions, gather-based energies, a convolution), for
single and tuple argnums, COO and CSR layouts, chunked colours; the generated body holds
tensors sized by the colours, not the dense result; bad uses fail clearly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, assert_same_tree, reference
from torch.func import vmap

import hod

D = torch.float64


def poisson(u):
    """A 2-D five-point residual with zero boundary, on an ``(n, n)`` grid."""
    p = F.pad(u, (1, 1, 1, 1))
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u
    return lap + torch.exp(u)


def chained_rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def banded(x):
    """Interactions between entries up to three apart."""
    return (torch.sin(x[:-3] * x[3:]).sum() + (x[:-1] * x[1:]).pow(2).sum()
            + torch.cosh(x).sum())


ELEMENTS = torch.randint(0, 30, (40, 3), generator=torch.Generator().manual_seed(4))


def energy(x):
    """A partially separable energy over random 3-entry elements (gather-based)."""
    e = x[ELEMENTS]
    return (e.prod(dim=1).tanh() + (e[:, 0] - e[:, 2]) ** 4).sum()


KERNEL = torch.tensor([[[0.5, -1.0, 2.0]]], dtype=D)


def conv_residual(u):
    return F.conv1d(u.reshape(1, 1, -1), KERNEL.to(u), padding=1).reshape(-1) + u ** 3


def two_arguments(x, y):
    return torch.tanh(x[1:] * y[:-1]) + x[:-1].exp() * y[1:]


JACOBIANS = [
    (poisson, (torch.randn(6, 6, dtype=D),)),
    (conv_residual, (torch.randn(12, dtype=D),)),
    (two_arguments, (torch.randn(9, dtype=D), torch.randn(9, dtype=D))),
]
HESSIANS = [
    (chained_rosenbrock, (torch.randn(20, dtype=D),)),
    (banded, (torch.randn(16, dtype=D),)),
    (energy, (torch.randn(30, dtype=D),)),
]


def dense(tree):
    return torch.utils._pytree.tree_map(lambda t: t.to_dense(), tree)


def nonzeros(tree):
    return sum(int(t.to_dense().ne(0).sum()) for t in torch.utils._pytree.tree_leaves(tree))


@pytest.mark.parametrize("f,args", JACOBIANS, ids=lambda v: getattr(v, "__name__", ""))
def test_sparse_jacobians_equal_torch_func(f, args):
    argnums = tuple(range(len(args))) if len(args) > 1 else 0
    result = hod.jacobian(f, argnums, sparse=True)(*args)
    assert all(t.layout is torch.sparse_coo for t in torch.utils._pytree.tree_leaves(result))
    expected = reference(f, 1, argnums)(*args)
    assert_same_tree(dense(result), expected)
    stored = sum(t._nnz() for t in torch.utils._pytree.tree_leaves(result))
    assert stored == nonzeros(expected)  # the pattern is exact here


@pytest.mark.parametrize("f,args", HESSIANS, ids=lambda v: getattr(v, "__name__", ""))
def test_sparse_hessians_equal_torch_func(f, args):
    result = hod.hessian(f, sparse=True)(*args)
    expected = reference(f, 2)(*args)
    assert_same_tree(result.to_dense(), expected)
    assert result._nnz() == nonzeros(expected)


@pytest.mark.parametrize("f,args,order", [(*HESSIANS[0], 2), (*HESSIANS[2], 2),
                                          (*JACOBIANS[0], 1)],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_float32(f, args, order):
    rtol, atol = TOLERANCES[torch.float32]
    args32 = tuple(a.float() for a in args)
    result = hod.derivative(f, order, sparse=True)(*args32)
    expected = reference(f, order)(*args).float()
    assert_same_tree(result.to_dense(), expected, rtol=rtol, atol=atol)


def test_tuple_argnums_hessian_blocks_are_each_sparse():
    def f(x, y):
        return chained_rosenbrock(torch.cat([x, y])) + (x * y).sum()

    x, y = torch.randn(7, dtype=D), torch.randn(7, dtype=D)
    result = hod.hessian(f, (1, 0), sparse=True)(x, y)
    assert all(t.is_sparse for t in torch.utils._pytree.tree_leaves(result))
    assert_same_tree(dense(result), reference(f, 2, (1, 0))(x, y))


def test_few_colours_and_the_sparsity_shown():
    x = torch.randn(50, dtype=D)
    lowered = hod.hessian(chained_rosenbrock, sparse=True).lower(x)
    assert lowered.sparsity.colours == 3  # tridiagonal: star colouring needs 3
    assert lowered.sparsity.nnz == 50 + 2 * 49
    assert lowered.sparsity.shape == (50, 50)
    assert "colours" in repr(lowered.sparsity)


def test_body_tensors_scale_with_colours_not_dense_size():
    x = torch.randn(400, dtype=D)
    lowered = hod.hessian(chained_rosenbrock, sparse=True).lower(x)
    sizes = [n.meta["val"].numel() for n in lowered.body.graph_module.graph.nodes
             if isinstance(n.meta.get("val"), torch.Tensor)]
    assert max(sizes) <= 4 * 400 * lowered.sparsity.colours < 400 * 400 // 10


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunked_colours(chunk_size):
    x = torch.randn(30, dtype=D)
    fn = hod.hessian(energy, sparse=True, chunk_size=chunk_size)
    lowered = fn.lower(x)
    assert lowered.chunks == -(-lowered.sparsity.colours // chunk_size)
    assert_same_tree(fn(x).to_dense(), reference(energy, 2)(x))


def test_csr_layout_and_has_aux():
    u = torch.randn(12, dtype=D)

    def with_aux(u):
        return conv_residual(u), u.sum()

    result, aux = hod.jacobian(with_aux, has_aux=True, sparse=True, layout=torch.sparse_csr)(u)
    assert result.layout is torch.sparse_csr
    assert_same_tree(result.to_dense(), reference(conv_residual, 1)(u))
    assert torch.equal(aux, u.sum())


@pytest.mark.parametrize("make,message", [
    (lambda: hod.derivative(banded, 3, sparse=True), "orders 1 and 2"),
    (lambda: hod.hessian(banded, sparse="yes"), "sparse must be True or False"),
    (lambda: hod.hessian(banded, sparse=True, layout=torch.strided), "layout must be"),
    (lambda: hod.hessian(banded, layout=torch.sparse_csr), "applies to sparse results only"),
])
def test_bad_keywords(make, message):
    with pytest.raises(hod.InputError, match=message):
        make()


def test_errors_at_call():
    with pytest.raises(hod.OutputError, match="one number"):
        hod.hessian(poisson, sparse=True)(torch.randn(4, 4, dtype=D))
    with pytest.raises(hod.InputError, match="2-D blocks"):
        hod.jacobian(poisson, sparse=True, layout=torch.sparse_csr)(torch.randn(4, 4, dtype=D))
    with pytest.raises(hod.OutputError, match=r"one number, got \(8,\) per example"):
        vmap(hod.hessian(torch.sin, sparse=True))(torch.randn(3, 8, dtype=D))
    with pytest.raises(hod.InputError, match="cannot come out of torch.func.vmap"):
        vmap(hod.jacobian(conv_residual, sparse=True, layout=torch.sparse_csr))(
            torch.randn(3, 8, dtype=D))


@pytest.mark.parametrize("f,args,order", [*[(*case, 1) for case in JACOBIANS],
                                          *[(*case, 2) for case in HESSIANS]],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_under_vmap_every_example_gets_its_sparse_blocks(f, args, order):
    """``vmap`` over a sparse transform: one batched COO tensor per block, ``(B,) + block``,
    equal to vmapped torch.func, storing each example's nonzeros only."""
    argnums = tuple(range(len(args))) if len(args) > 1 else 0
    batch = tuple(torch.stack([a, 2 * a.flip(0), a.cos()]) for a in args)
    result = vmap(hod.derivative(f, order, argnums, sparse=True))(*batch)
    leaves = torch.utils._pytree.tree_leaves(result)
    assert all(t.layout is torch.sparse_coo and t.shape[0] == 3 for t in leaves)
    expected = vmap(reference(f, order, argnums))(*batch)
    assert_same_tree(dense(result), expected)
    single = hod.derivative(f, order, argnums, sparse=True)(*args)
    assert sum(t._nnz() for t in leaves) == 3 * sum(
        t._nnz() for t in torch.utils._pytree.tree_leaves(single))


def test_under_nested_vmap_unbatched_arguments_and_float32():
    w = torch.randn(3, 30, dtype=D)
    xs = torch.randn(2, 3, 30, dtype=D)
    hessian = vmap(vmap(hod.hessian(energy, sparse=True)))
    assert_same_tree(dense(hessian(xs)), vmap(vmap(reference(energy, 2)))(xs))
    rtol, atol = TOLERANCES[torch.float32]
    assert_same_tree(dense(hessian(xs.float())),
                     vmap(vmap(reference(energy, 2)))(xs).float(), rtol=rtol, atol=atol)

    def scaled(x, a):  # x unbatched: every example differentiates its own copy
        return banded(x * a)

    x = torch.randn(30, dtype=D)
    result = vmap(hod.hessian(scaled, sparse=True), in_dims=(None, 0))(x, w)
    assert_same_tree(result.to_dense(), vmap(reference(scaled, 2), in_dims=(None, 0))(x, w))


def test_under_vmap_a_conservative_pattern_keeps_each_examples_block():
    """An op the analysis takes as dense (``slogdet``) gives the batched function a pattern
    that is not block diagonal (144 of 144 entries): each example still gets its own block
    only."""
    xs = torch.randn(3, 4, dtype=D)

    def f(x):
        return x * torch.linalg.slogdet(x.reshape(2, 2))[1]

    result = vmap(hod.jacobian(f, sparse=True))(xs)
    assert_same_tree(result.to_dense(), vmap(reference(f, 1))(xs))
    assert result._nnz() == 3 * 16


def test_under_vmap_with_aux_and_chunks():
    us = torch.randn(4, 12, dtype=D)

    def with_aux(u):
        return conv_residual(u), u.sum()

    jacobian = hod.jacobian(with_aux, has_aux=True, sparse=True, chunk_size=2)
    result, aux = vmap(jacobian)(us)
    assert_same_tree(result.to_dense(), vmap(reference(conv_residual, 1))(us))
    assert torch.equal(aux, us.sum(1))
    hessian = hod.hessian(lambda x: (energy(x), x.max()), has_aux=True, sparse=True)
    xs = torch.randn(3, 30, dtype=D)
    result, aux = vmap(hessian)(xs)
    assert_same_tree(result.to_dense(), vmap(reference(energy, 2))(xs))
    assert torch.equal(aux, xs.max(1).values)


def test_a_function_vmapped_over_examples_gives_block_diagonal_derivatives():
    """A function vmapped over independent examples differentiated whole (what a sparse
    transform under vmap runs): its pattern is block diagonal and coloured like one
    example's (4 colours for 50 examples of 4 entries)."""
    w = torch.randn(4, 4, dtype=D)

    def f(x):
        return torch.tanh(w @ x) * x

    def loss(xs):
        return vmap(lambda x: torch.tanh(w @ x).pow(2).sum())(xs).sum()

    xs = torch.randn(50, 4, dtype=D)
    jacobian = hod.jacobian(vmap(f), sparse=True)
    assert jacobian.lower(xs).sparsity.colours == 4
    assert_same_tree(jacobian(xs).to_dense(), reference(vmap(f), 1)(xs))
    hessian = hod.hessian(loss, sparse=True)
    assert hessian.lower(xs).sparsity.colours == 4
    assert_same_tree(hessian(xs).to_dense(), reference(loss, 2)(xs))


def test_a_captured_tensor_changed_in_place_is_seen():
    """The pattern relies on a captured matrix's zeros; filling them in place (an optimiser
    step) makes hod find the pattern again."""
    a = torch.diag(torch.arange(1.0, 6.0, dtype=D))

    def f(x):
        return torch.tanh(a @ x)

    x = torch.randn(5, dtype=D)
    fn = hod.jacobian(f, sparse=True)
    assert fn(x)._nnz() == 5
    a.add_(0.5)
    assert fn(x)._nnz() == 25
    assert_same_tree(fn(x).to_dense(), reference(f, 1)(x))


@pytest.mark.parametrize("f,args,order", [(*JACOBIANS[0], 1), (*JACOBIANS[2], 1),
                                          (*HESSIANS[0], 2), (*HESSIANS[1], 2)],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_dense_results_of_few_colours_come_from_the_coloured_sweep(f, args, order):
    """A dense transform whose pattern needs few colours against the seeds its code pushes
    computes the dense result from them: equal to torch.func (float64 and float32), an
    ordinary strided tensor."""
    argnums = tuple(range(len(args))) if len(args) > 1 else 0
    big = tuple(torch.randn(a.shape[0] * 40, *a.shape[1:], dtype=D) for a in args)
    if f is poisson:
        big = (torch.randn(20, 20, dtype=D),)
    fn = hod.derivative(f, order, argnums)
    assert fn.lower(*big).coloured is not None
    result = fn(*big)
    assert all(t.layout is torch.strided for t in torch.utils._pytree.tree_leaves(result))
    assert_same_tree(result, reference(f, order, argnums)(*big))
    rtol, atol = TOLERANCES[torch.float32]
    expected = torch.utils._pytree.tree_map(torch.Tensor.float, reference(f, order, argnums)(*big))
    assert_same_tree(fn(*(a.float() for a in big)), expected, rtol=rtol, atol=atol)


def test_dense_patterns_and_watched_tensors_keep_the_dense_code():
    x = torch.randn(40, dtype=D)
    w = torch.randn(40, 40, dtype=D)

    def dense_loss(x):
        return torch.tanh(w @ x).pow(2).sum()

    assert hod.hessian(dense_loss).lower(x).coloured is None
    assert hod.hessian(chained_rosenbrock).lower(x).coloured is None  # too small to pay
    x = torch.randn(400, dtype=D)
    fn = hod.hessian(chained_rosenbrock)
    assert fn.lower(x).coloured is not None
    watched = x.clone().requires_grad_()
    result = fn(watched)  # autograd reaches the input through the dense code
    assert result.grad_fn is not None
    assert_same_tree(result.detach(), reference(chained_rosenbrock, 2)(x))


def test_the_coloured_sweep_returns_aux():
    u = torch.randn(400, dtype=D)

    def with_aux(u):
        return conv_residual(u), u.sum()

    fn = hod.jacobian(with_aux, has_aux=True)
    assert fn.lower(u).coloured is not None
    result, aux = fn(u)
    assert_same_tree(result, reference(conv_residual, 1)(u))
    assert torch.equal(aux, u.sum())


def test_the_coloured_sweep_takes_keyword_tensors_and_sees_captured_changes():
    """The coloured runner puts the directions between the positional and the keyword
    tensors, reuses its index lists across calls, and makes them again when a captured
    matrix's zeros move (an in-place change)."""
    a = torch.diag(torch.rand(300, dtype=D) + 0.5)

    def f(x, *, scale):
        return (scale * torch.tanh(a @ x)).pow(2).sum() + x.pow(4).sum()

    fn = hod.hessian(f)
    scale = torch.rand(300, dtype=D)
    for _ in range(2):
        x = torch.randn(300, dtype=D)
        assert fn.lower(x, scale=scale).coloured is not None
        assert_same_tree(fn(x, scale=scale), reference(lambda x: f(x, scale=scale), 2)(x))
    a[torch.arange(299), torch.arange(1, 300)] = 0.5  # a second band
    assert_same_tree(fn(x, scale=scale), reference(lambda x: f(x, scale=scale), 2)(x))
