"""hod transforms under ``torch.func.vmap`` run hod's own batched code (``hod._vmap``).

Every test checks two things: the values (against ``vmap`` of the matching torch.func
nesting in float64, or against a per-example loop where torch.func's batched formulas are
wrong, as for ``det`` and ``solve``), and that the batched code ran: ``.lower()`` called
under the same vmap returns code whose ``examples`` is the number of examples (None would
mean functorch batched hod's unbatched code).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, exact_laplacian, reference
from models import tanh_loss
from torch.func import grad, hessian, jacrev, vmap

import hod

D = torch.float64


def lowered_under(vmapped_call, fn):
    """What ``fn.lower`` returns inside ``vmapped_call`` (a function of ``lower`` that
    runs it under the vmap in question)."""
    box = []
    vmapped_call(lambda *args, **kwargs: box.append(fn.lower(*args, **kwargs)))
    return box[0]


def batched_code(fn, in_dims, *args):
    """The code ``vmap(fn, in_dims)(*args)`` runs."""

    def call(lower):
        def one(*a):
            lower(*a)
            return torch.zeros(())

        vmap(one, in_dims)(*args)

    return lowered_under(call, fn)


def vector_field(x):
    """``(3,) -> (2,)`` with full second and third derivatives."""
    return torch.stack([torch.sin(x).prod() + (x**3).sum(), torch.exp(0.3 * x).sum() * x[0]])


TRANSFORMS = {
    "jacobian": (lambda f: hod.jacobian(f), lambda f: jacrev(f)),
    "hessian": (lambda f: hod.hessian(f), lambda f: hessian(f)),
    "order-3": (lambda f: hod.derivative(f, 3), lambda f: reference(f, 3)),
    "derivatives": (lambda f: hod.derivatives(f, 2),
                    lambda f: lambda x: (f(x), jacrev(f)(x), hessian(f)(x))),
}


def wide_field(x):
    """``(8,) -> (2,)``: few outputs for many inputs, read in reverse-last mode."""
    return torch.stack([torch.tanh(x).prod(), (torch.sin(x) ** 3).sum() * x[0]])


#: name: (f, input size); each mode of the batched code: forward (vector), reverse-last of a
#: scalar (scalar) and reverse-last of a few outputs per example (wide).
FUNCTIONS = {
    "vector": (vector_field, 3),
    "scalar": (lambda x: torch.tanh(x).prod(), 3),
    "wide": (wide_field, 8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_transform_runs_batched_code(function, transform, dtype):
    f, size = FUNCTIONS[function]
    ours, theirs = TRANSFORMS[transform]
    X = torch.randn(5, size, dtype=dtype)
    fn = ours(f)
    expected = cast(vmap(theirs(f))(X.double()), dtype)
    assert_same_tree(vmap(fn)(X), expected, *TOLERANCES[dtype])
    assert batched_code(fn, 0, X).examples == 5


@pytest.mark.parametrize("in_dims", [(0, None), (1, None), (None, 0), (0, 0), (1, 0)])
@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_in_dims_and_argnums(in_dims, argnums):
    """A differentiated argument vmap does not batch is expanded over the examples."""
    x = torch.randn(*((3, 4) if in_dims[0] == 1 else (4, 3) if in_dims[0] == 0 else (3,)),
                    dtype=D)
    W = torch.randn(*((4, 3, 2) if in_dims[1] == 0 else (3, 2)), dtype=D)
    fn = hod.hessian(tanh_loss, argnums)
    actual = vmap(fn, in_dims)(x, W)
    assert_same_tree(actual, vmap(hessian(tanh_loss, argnums), in_dims)(x, W))
    assert batched_code(fn, in_dims, x, W).examples == 4


def test_has_aux_and_pytree_arguments():
    def f(p, scale):
        y = torch.tanh(p["a"] * p["b"]).sum() * scale
        return y, {"y": y, "twice": 2 * p["a"]}

    P = {"a": torch.randn(4, 3, dtype=D), "b": torch.randn(3, dtype=D)}
    fn = hod.hessian(f, has_aux=True)
    in_dims = ({"a": 0, "b": None}, None)
    actual = vmap(fn, in_dims)(P, 1.5)
    assert_same_tree(actual, vmap(reference(f, 2, has_aux=True), in_dims)(P, 1.5))
    assert batched_code(fn, in_dims, P, 1.5).examples == 4


def test_vmap_of_vmap_is_one_batch_of_their_product():
    """Two levels, batching different arguments, become 2 x 3 examples of one code."""
    x, W = torch.randn(2, 3, dtype=D), torch.randn(3, 3, 2, dtype=D)
    fn = hod.hessian(tanh_loss, (0, 1))

    def nested(g):
        return vmap(vmap(g, in_dims=(None, 0)), in_dims=(0, None))

    assert_same_tree(nested(fn)(x, W), nested(hessian(tanh_loss, (0, 1)))(x, W))

    def call(lower):
        nested(lambda x, W: (lower(x, W), x.sum())[1])(x, W)

    assert lowered_under(call, fn).examples == 6


def test_grad_through_vmap_of_hod():
    X, W = torch.randn(4, 3, dtype=D), torch.randn(3, 2, dtype=D)

    def curvature(W, hessian_fn):
        return vmap(hessian_fn(tanh_loss), in_dims=(0, None))(X, W).diagonal(0, 1, 2).sum()

    assert_same_tree(grad(curvature)(W, hod.hessian), grad(curvature)(W, hessian))


def test_backward_through_vmap_of_hod_reaches_captured_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.to(D)
    X = torch.randn(5, 3, dtype=D)

    def parameter_grads(hessian_fn):
        curvature = vmap(hessian_fn(lambda x: model(x).sum()))(X).diagonal(0, 1, 2).sum()
        return torch.autograd.grad(curvature, list(model.parameters()), materialize_grads=True)

    assert_same_tree(parameter_grads(hod.hessian), parameter_grads(hessian))


@pytest.mark.parametrize("op", ["det", "solve"])
def test_ops_whose_batched_torch_func_formulas_are_wrong(op):
    """``vmap(torch.func.hessian(det))`` is wrong in torch 2.13 (so is ``solve``'s); the
    batched code equals hod's unbatched code and torch.func's per-example loop."""
    def f(x):
        A = x.reshape(2, 2) + 3 * torch.eye(2, dtype=x.dtype)
        return torch.linalg.det(A) if op == "det" else torch.linalg.solve(A, x[:2]).sum()

    X = torch.randn(3, 4, dtype=D)
    fn = hod.hessian(f)
    per_example = torch.stack([hessian(f)(x) for x in X])
    assert_same_tree(vmap(fn)(X), per_example)
    assert_same_tree(vmap(fn)(X), torch.stack([fn(x) for x in X]))
    assert batched_code(fn, 0, X).examples == 3


def test_cache_is_keyed_by_the_batched_signature():
    """Calls whose examples unwrap alike share code: batching ``x`` by rows or by columns
    of its transpose is one batched signature."""
    x, W = torch.randn(4, 3, dtype=D), torch.randn(3, 2, dtype=D)
    fn = hod.hessian(tanh_loss)
    rows = batched_code(fn, (0, None), x, W)
    assert batched_code(fn, (0, None), x, W) is rows  # generated once
    assert batched_code(fn, (1, None), x.T.contiguous(), W) is rows
    stacked = batched_code(fn, (None, 0), x[0], torch.randn(4, 3, 2, dtype=D))
    assert stacked is not rows and stacked.examples == 4
    assert batched_code(fn, (0, None), x[:2], W).examples == 2
    assert fn.lower(x[0], W).examples is None  # outside vmap: the unbatched code


def test_a_function_vmap_cannot_trace_falls_back_to_functorch_batching():
    """Writing a batched value into a fresh tensor in place is refused by vmap, so the
    batched code cannot be traced; hod's unbatched code is functional, and functorch
    batches it."""
    def f(x):
        y = torch.zeros(4, dtype=x.dtype)
        y.copy_(x)
        return y.sin().pow(2).sum()

    X = torch.randn(3, 4, dtype=D)
    fn = hod.hessian(f)
    assert_same_tree(vmap(fn)(X), torch.stack([hessian(f)(x) for x in X]))
    assert batched_code(fn, 0, X).examples is None


def dropped(x):
    mask = torch.bernoulli(torch.full_like(x, 0.5))
    return (torch.sin(x) * mask).sum()


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_randomness_with_allow_random(randomness):
    """Each example's Hessian is ``diag(-sin(x) * mask)``: one mask for all examples with
    ``"same"``, one per example with ``"different"``."""
    X = torch.rand(16, 8, dtype=D) + 0.5  # sin(x) > 0, so the mask reads off the diagonal
    fn = hod.hessian(dropped, allow_random=True)
    H = vmap(fn, randomness=randomness)(X)
    masks = -H.diagonal(0, 1, 2) / torch.sin(X)
    assert_same_tree(H, torch.diag_embed(H.diagonal(0, 1, 2)))
    assert set(masks.round().unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(masks, masks.round())
    assert bool((masks == masks[0]).all()) == (randomness == "same")


def test_randomness_error_raises_as_vmap_does():
    fn = hod.hessian(dropped, allow_random=True)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(fn)(torch.rand(4, 3, dtype=D))


# -- the Taylor transforms -------------------------------------------------------------------
def tanh_net(x, W1, w2):
    return torch.tanh(x @ W1) @ w2


def net_params():
    return torch.randn(3, 5, dtype=D), torch.randn(5, dtype=D)


def test_jet_over_data_points_and_directions():
    W1, w2 = net_params()
    X, V = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    jf = hod.jet(tanh_net, 2)
    actual = vmap(lambda x, v: jf((x, W1, w2), v))(X, V)
    H = torch.stack([hessian(tanh_net)(x, W1, w2) for x in X])
    g = vmap(grad(tanh_net), in_dims=(0, None, None))(X, W1, w2)
    assert_same_tree(actual[0], vmap(tanh_net, in_dims=(0, None, None))(X, W1, w2))
    assert_same_tree(actual[1][0], (g * V).sum(1))
    assert_same_tree(actual[1][1], torch.einsum("bi,bij,bj->b", V, H, V))

    def call(lower):
        vmap(lambda x, v: (lower((x, W1, w2), v), x.sum())[1])(X, V)

    assert lowered_under(call, jf).examples == 4


def test_hvp_over_tangents():
    W1, w2 = net_params()
    x, V = torch.randn(3, dtype=D), torch.randn(6, 3, dtype=D)
    hf = hod.hvp(tanh_net)
    actual = vmap(lambda v: hf((x, W1, w2), v))(V)
    H = hessian(tanh_net)(x, W1, w2)
    assert_same_tree(actual, V @ H)

    def call(lower):
        vmap(lambda v: (lower((x, W1, w2), v), v.sum())[1])(V)

    assert lowered_under(call, hf).examples == 6


@pytest.mark.parametrize("kind", ["exact", "value_and_grad", "weighted", "biharmonic",
                                  "operator"])
def test_operators_over_data_points(kind):
    W1, w2 = net_params()
    X = torch.randn(4, 3, dtype=D)
    C = torch.randn(3, 3, dtype=D)
    per_point = torch.stack([hessian(tanh_net)(x, W1, w2) for x in X])
    fourth = torch.stack([reference(tanh_net, 4)(x, W1, w2) for x in X])
    fn, expected = {
        "exact": (hod.laplacian(tanh_net), exact_laplacian_rows(X, W1, w2)),
        "value_and_grad": (hod.laplacian(tanh_net, value_and_grad=True), (
            vmap(tanh_net, in_dims=(0, None, None))(X, W1, w2),
            vmap(grad(tanh_net), in_dims=(0, None, None))(X, W1, w2),
            exact_laplacian_rows(X, W1, w2))),
        "weighted": (hod.laplacian(tanh_net, weights=C), (per_point * C).sum((1, 2))),
        "biharmonic": (hod.biharmonic(tanh_net), torch.einsum("biijj->b", fourth)),
        "operator": (hod.operator(tanh_net, {(0, 0): 1.0, (1, 2): -2.0, (2,): 0.5}),
                     per_point[:, 0, 0] - 2 * per_point[:, 1, 2]
                     + 0.5 * vmap(grad(tanh_net), in_dims=(0, None, None))(X, W1, w2)[:, 2]),
    }[kind]
    in_dims = (0, None, None)
    assert_same_tree(vmap(fn, in_dims)(X, W1, w2), expected)
    assert batched_code(fn, in_dims, X, W1, w2).examples == 4


def exact_laplacian_rows(X, W1, w2):
    return torch.stack([exact_laplacian(tanh_net, (x, W1, w2)) for x in X])


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_stochastic_laplacian_runs_batched_code(randomness):
    W1, w2 = net_params()
    X = torch.randn(4, 3, dtype=D)
    fn = hod.laplacian(tanh_net, samples=2, generator=torch.Generator().manual_seed(0))
    in_dims = (0, None, None)
    estimate = vmap(fn, in_dims, randomness=randomness)(X, W1, w2)
    assert estimate.shape == (4,) and torch.isfinite(estimate).all()

    def call(lower):
        vmap(lambda *a: (lower(*a), a[0].sum())[1], in_dims, randomness=randomness)(
            X, W1, w2)

    assert lowered_under(call, fn).examples == 4
