"""Sparsity detection (hod._sparsity): the detected Jacobian and Hessian patterns equal the
nonzeros of dense torch.func results on every op family with a rule and on whole problems
(stencils, chained and banded functions, gather energies, convolutions, an MLP), and hold
them on every op database entry.

The reference is the union of the nonzeros over a few random points, so a value that
happens to vanish does not hide an entry."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from opdb import OPS
from torch.func import hessian, jacfwd, jacrev

from hod._records import Request
from hod._signature import flatten_call
from hod._sparsity import constants_fingerprint, hessian_pattern, jacobian_pattern
from hod._tracing import trace_forward

D = torch.float64
POINTS = 3


def traced(f, args: tuple, argnums: tuple[int, ...] = (0,)):
    """``f``'s graph as hod traces it, its differentiated placeholders and outputs."""
    flat = flatten_call(args, {}, argnums, "test")
    request = Request(f=f, order=1, argnums=argnums, has_aux=False, with_values=False,
                      call="test", memory_limit=None)
    forward = trace_forward(request, flat)
    return forward.gm, flat.diff, forward.n_out


def as_set(indices: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, indices.t().tolist()))


def _blocks(result, args: tuple, argnums: tuple[int, ...]) -> torch.Tensor:
    """A dense Jacobian (tuple over outputs of tuples over argnums) as one matrix."""
    single = len(argnums) > 1 and not isinstance(result[0], tuple)  # one output, several args
    outs = result if isinstance(result, tuple) and not single else (result,)
    rows = []
    for out in outs:
        parts = out if isinstance(out, tuple) else (out,)
        rows.append(torch.cat([p.reshape(-1, args[a].numel()) if p.dim() else p.reshape(1, 1)
                               for p, a in zip(parts, argnums, strict=True)], 1))
    return torch.cat(rows, 0)


def dense_nonzeros(f, args: tuple, argnums=(0,), order: int = 1) -> set[tuple[int, int]]:
    """The union over ``POINTS`` random points of the nonzeros of f's dense Jacobian
    (``order=1``) or Hessian (``order=2``, one argument), perturbing the differentiated
    arguments."""
    found: set[tuple[int, int]] = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(POINTS):
        point = list(args)
        for a in argnums:
            point[a] = args[a] + 0.3 * torch.randn(args[a].shape, generator=generator, dtype=D)
        if order == 1:
            matrix = _blocks(jacrev(f, argnums)(*point), tuple(point), argnums)
        else:
            matrix = hessian(f)(*point).reshape(point[0].numel(), -1)
        found |= as_set(matrix.nonzero().t())
    return found


def detected(f, args: tuple, argnums=(0,)) -> set[tuple[int, int]]:
    gm, diff, n_out = traced(f, args, argnums)
    indices = jacobian_pattern(gm, diff, n_out)
    assert indices.dtype == torch.long and indices.shape[0] == 2
    keys = indices[0] * 10**9 + indices[1]
    assert bool((keys[1:] > keys[:-1]).all()), "not coalesced (sorted, unique)"
    return as_set(indices)


def detected_hessian(f, args: tuple) -> set[tuple[int, int]]:
    gm, diff, n_out = traced(f, args)
    return as_set(hessian_pattern(gm, diff, n_out))


def x_(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# Constants with zeros: their zeros must shape the pattern.
SPARSE_MATRIX = torch.tensor([[1.0, 0, 0, 2, 0, 0], [0, 0, 3, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                              [4, 0, 0, 0, 0, 5]], dtype=D)
MASK = torch.tensor([1.0, 0, 2, 0, 0, 3], dtype=D)
KERNEL = torch.tensor([1.0, 0.0, -2.0], dtype=D)
INDEX = torch.tensor([4, 0, 0, 5, 2])
W1, W2, W3 = x_(5, 4, seed=3), x_(4, 3, seed=4), x_(4, 1, seed=5)
ELEMENTS = torch.tensor([[0, 3, 7], [1, 2, 9], [4, 5, 6], [8, 9, 0], [2, 6, 10]])


def laplacian(u: torch.Tensor) -> torch.Tensor:
    """5-point Laplacian of a grid with zero Dirichlet boundary, ``(n, n) -> (n, n)``."""
    v = F.pad(u, (1, 1, 1, 1))
    return 4 * u - v[:-2, 1:-1] - v[2:, 1:-1] - v[1:-1, :-2] - v[1:-1, 2:]


def bratu(u: torch.Tensor) -> torch.Tensor:
    return laplacian(u) - 2.0 * torch.exp(u)


def chained_rosenbrock_residual(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([10 * (x[1:] - x[:-1] ** 2), 1 - x[:-1]])


def banded(x: torch.Tensor) -> torch.Tensor:
    """Broyden banded: each entry couples the entries within 2 below and 1 above."""
    padded = F.pad(x, (2, 1))
    near = padded[:-3] + padded[1:-2] + padded[3:]
    return x * (2 + 5 * x**2) + 1 - near * (1 + near)


def element_energies(x: torch.Tensor) -> torch.Tensor:
    corners = x[ELEMENTS]
    return ((corners - corners.mean(1, keepdim=True)) ** 2).sum(1) + torch.cos(corners[:, 0])


def conv_residual(u: torch.Tensor) -> torch.Tensor:
    return F.conv1d(u[None, None], KERNEL[None, None], padding=1)[0, 0] + u**3


JACOBIAN_CASES = {
    # elementwise, with broadcasting and constant zeros
    "unary": (lambda x: torch.tanh(x) + torch.exp(-x) * torch.sin(x), (x_(7),)),
    "broadcast_rows": (lambda x: x.view(3, 4) * x[:4] - x.view(3, 4)[:, :1], (x_(12),)),
    "mul_by_sparse_constant": (lambda x: x * MASK, (x_(6),)),
    "where_constant_condition": (lambda x: torch.where(MASK > 0, x, x.flip(0) ** 2), (x_(6),)),
    "division": (lambda x: x[:3] / (1 + x[3:] ** 2), (x_(6),)),
    # views and data movement
    "views": (lambda x: x.view(2, 3, 2).permute(2, 0, 1).transpose(0, 2).reshape(-1)
              .unsqueeze(0).expand(2, 12).squeeze(), (x_(12),)),
    "slices": (lambda x: torch.cat([x[1:5:2], x[-1:], x.view(3, 4)[1], x.narrow(0, 2, 3)]),
               (x_(12),)),
    "stack_flip_roll": (lambda x: torch.stack([x.flip(0), torch.roll(x, 2), x * 2]), (x_(5),)),
    "pads": (lambda x: torch.cat([F.pad(x, (2, 1), value=3.0), F.pad(x.view(1, 1, 6), (2, 2),
                                                                      mode="reflect").flatten()]),
             (x_(6),)),
    "index_select_gather": (lambda x: torch.cat([x.index_select(0, INDEX), x[INDEX] ** 2,
                                                 torch.gather(x.view(2, 3), 1, INDEX[:4].view(2, 2)
                                                              % 3).flatten()]), (x_(6),)),
    "scatter_and_index_put": (lambda x: torch.cat([
        torch.zeros(8, dtype=D).scatter(0, INDEX[:3], x[:3]),
        x.index_put((INDEX[:2],), x[4:6] * 3),
    ]), (x_(6),)),
    "additive_scatters": (lambda x: torch.cat([
        torch.zeros(6, dtype=D).scatter_add(0, INDEX, x[:5]),
        x.index_add(0, INDEX[:3], x[3:]),
        torch.zeros(6, dtype=D).index_put((INDEX,), x[1:], accumulate=True),
    ]), (x_(6),)),
    "repeat_tril_diagonal": (lambda x: torch.cat([x[:3].repeat(2), x[:9].view(3, 3).tril()
                                                  .flatten(), torch.diagonal(x[:9].view(3, 3))]),
                             (x_(9),)),
    "split_unbind": (lambda x: torch.cat([p * (i + 1) for i, p in enumerate(x.split(3))]
                                         + list(x.view(2, 3).unbind(1))), (x_(6),)),
    # reductions, softmaxes, cumulative ops
    "reductions": (lambda x: torch.cat([x.view(3, 4).sum(0), x.view(3, 4).mean(1),
                                        x.view(3, 4).prod(1), torch.logsumexp(x.view(3, 4), 0),
                                        x.view(3, 4).var(1), x.view(3, 4).norm(dim=0),
                                        x.sum().view(1), torch.stack(torch.var_mean(
                                            x.view(3, 4), 0)).flatten()]), (x_(12),)),
    "softmax": (lambda x: torch.cat([torch.softmax(x.view(2, 3), 1).flatten(),
                                     torch.log_softmax(x.view(2, 3), 0).flatten()]), (x_(6),)),
    "cumulative": (lambda x: torch.cat([torch.cumsum(x.view(2, 3), 1).flatten(),
                                        torch.cumprod(x, 0)]), (x_(6),)),
    # products
    "matmul_sparse_constant": (lambda x: SPARSE_MATRIX @ x, (x_(6),)),
    "matmul_sparse_constant_right": (lambda x: x.view(2, 4) @ SPARSE_MATRIX, (x_(8),)),
    "matmul_variables": (lambda x: x[:6].view(2, 3) @ x[6:].view(3, 2), (x_(12),)),
    "bmm_einsum": (lambda x: torch.einsum("bij,bjk->bik", x[:8].view(2, 2, 2), x[8:].view(2, 2, 2)),
                   (x_(16),)),
    "linear_constant": (lambda x: F.linear(x.view(2, 6), SPARSE_MATRIX, MASK[:4]), (x_(12),)),
    "mv_dot": (lambda x: torch.cat([torch.mv(SPARSE_MATRIX, x), torch.dot(x, MASK).view(1),
                                    torch.dot(x, x.flip(0)).view(1)]), (x_(6),)),
    # convolutions
    "conv1d_constant_weight": (lambda x: F.conv1d(x.view(1, 2, 5), torch.stack(
        [KERNEL, KERNEL.flip(0)]).view(1, 2, 3), padding=1).flatten(), (x_(10),)),
    "conv1d_strided_dilated": (lambda x: F.conv1d(x.view(1, 1, 9), KERNEL.view(1, 1, 3), stride=2,
                                                  dilation=2, padding=2).flatten(), (x_(9),)),
    "conv2d_groups": (lambda x: F.conv2d(x.view(1, 2, 4, 4), torch.tensor(
        [[[[1.0, 0], [0, 1]]], [[[0, 2.0], [0, 0]]]], dtype=D), groups=2, padding=1).flatten(),
        (x_(32),)),
    "conv3d": (lambda x: F.conv3d(x.view(1, 1, 3, 3, 4), torch.tensor(
        [1.0, 0, 2, 0, 0, 3, 0, 4], dtype=D).view(1, 1, 2, 2, 2), padding=(1, 0, 1)).flatten(),
        (x_(36),)),
    "conv_transpose": (lambda x: F.conv_transpose2d(x.view(1, 2, 3, 3), torch.tensor(
        [1.0, 0, 2, 0, 0, 3, 0, 4, 5, 0, 0, 6, 7, 0, 0, 8], dtype=D).view(2, 2, 2, 2), stride=2,
        padding=1, output_padding=1, groups=2).flatten(), (x_(18),)),
    "avg_pools": (lambda x: torch.cat([F.avg_pool1d(x.view(2, 1, 9), 3, 2, 1).flatten(),
                                       F.avg_pool2d(x[:16].view(1, 4, 4), 2, 1).flatten()]),
                  (x_(18),)),
    # whole problems
    "laplacian_2d": (lambda u: laplacian(u), (x_(5, 5),)),
    "bratu_2d": (bratu, (x_(6, 6),)),
    "chained_rosenbrock": (chained_rosenbrock_residual, (x_(9),)),
    "broyden_banded": (banded, (x_(9),)),
    "gather_energies": (element_energies, (x_(11),)),
    "conv_residual": (conv_residual, (x_(10),)),
    "mlp_dense": (lambda x: torch.tanh(torch.tanh(x.view(2, 5) @ W1) @ W2),
                  (x_(10),)),
}


@pytest.mark.parametrize("name", list(JACOBIAN_CASES))
def test_jacobian_pattern_is_exact(name):
    f, args = JACOBIAN_CASES[name]
    want = dense_nonzeros(f, args)
    assert want, "a reference of zeros proves nothing"
    assert detected(f, args) == want


@pytest.mark.parametrize("transposed", [False, True])
def test_weights_and_inputs_of_a_convolution(transposed):
    """A variable weight: an output entry depends on the weights meeting a real input
    entry (not padding), and on its input window; its Hessian pairs those meeting."""
    conv = F.conv_transpose1d if transposed else F.conv1d

    def f(x, w):
        return conv(x.view(1, 1, 6), w.view(1, 2, 2) if transposed else w.view(2, 1, 2),
                    padding=1).flatten()

    def energy(xw):
        return torch.sin(f(xw[:6], xw[6:])).sum()

    args = (x_(6), x_(4, seed=2))
    assert detected(f, args, (0, 1)) == dense_nonzeros(f, args, (0, 1))
    joined = (torch.cat(args),)
    assert detected_hessian(energy, joined) == dense_nonzeros(energy, joined, order=2)


def test_several_outputs_and_arguments():
    def f(x, y):
        return (x[1:] * y[:-1], (x.sum() + y[0]).view(1))
    args = (x_(4), x_(4, seed=2))
    assert detected(f, args, (0, 1)) == dense_nonzeros(f, args, (0, 1))


def test_float32_identity_and_constant_outputs():
    """The pattern does not depend on the dtype; an output may be an input itself or hold
    no dependence at all (empty rows)."""
    u = x_(4, 4)
    gm, diff, n_out = traced(bratu, (u.float(),))
    assert as_set(jacobian_pattern(gm, diff, n_out)) == _stencil(4)

    def f(x):
        return x, torch.ones(2, dtype=D), x[1:] * x[:-1]

    args = (x_(3),)
    assert detected(f, args) == dense_nonzeros(f, args) == (
        {(0, 0), (1, 1), (2, 2), (5, 0), (5, 1), (6, 1), (6, 2)})


def test_constant_built_inside_f():
    """A matrix f builds from constants alone (eye, arange) is evaluated: its zeros count."""
    def f(x):
        return (torch.eye(5, dtype=D) * torch.arange(5.0, dtype=D)) @ x
    args = (x_(5),)
    got = detected(f, args)
    assert got == dense_nonzeros(f, args) == {(i, i) for i in range(1, 5)}


def test_a_captured_constant_changed_in_place_changes_the_fingerprint():
    """The graph holds the caller's tensors: a zero the pattern used may change later."""
    weights = torch.nn.Linear(3, 2, dtype=D)
    matrix = SPARSE_MATRIX.clone()
    with torch.no_grad():
        weights.weight[0] = 0.0

    def f(x):
        return weights(matrix[:3, :3] @ x)

    gm, diff, n_out = traced(f, (x_(3),))
    assert as_set(jacobian_pattern(gm, diff, n_out)) == {(1, 0), (1, 2)}
    before = constants_fingerprint(gm)
    assert constants_fingerprint(gm) == before
    matrix[1, 1] = 1.0
    assert constants_fingerprint(gm) != before
    before = constants_fingerprint(gm)
    with torch.no_grad():
        weights.weight.add_(1.0)
    assert constants_fingerprint(gm) != before
    assert as_set(jacobian_pattern(gm, diff, n_out)) == {(i, j) for i in (0, 1) for j in (0, 1, 2)}


def test_unanalysed_op_is_dense():
    """``sort`` has no rule: every sorted entry depends on every entry its input depends on
    (a superset of the permutation torch.func finds; the mask's zeros still count)."""
    def f(x):
        return torch.sort(x * MASK)[0] + x[0]
    args = (x_(6),)
    got = detected(f, args)
    want = dense_nonzeros(f, args)
    assert want < got
    assert got == {(i, j) for i in range(6) for j in (0, 2, 5)} | {(i, 0) for i in range(6)}


def test_a_rule_that_fails_falls_back_to_dense(monkeypatch):
    """A rule meeting a form it does not know gives way to the dense fallback, curvature
    included, instead of failing the build."""
    import hod._sparsity

    def broken(node, state):
        raise RuntimeError("an unexpected form")

    for op in (torch.ops.aten.mv.default, torch.ops.aten.mm.default):  # as torch.mv traces
        monkeypatch.setitem(hod._sparsity._RULES, op, broken)
    args = (x_(6),)
    assert detected(lambda x: torch.mv(SPARSE_MATRIX, x), args) == {
        (i, j) for i in range(4) for j in range(6)}
    assert detected_hessian(lambda x: torch.mv(SPARSE_MATRIX, x).sum(), args) == {
        (i, j) for i in range(6) for j in range(6)}


def test_index_from_an_argument_makes_the_op_dense():
    """A non-differentiated argument may change between calls: an index it holds cannot
    shape the pattern, so the indexing op is dense (a superset)."""
    def f(x, index):
        return x[index] * 2
    args = (x_(5), torch.tensor([1, 3]))
    got = detected(f, args)
    assert dense_nonzeros(f, args) < got == {(i, j) for i in range(2) for j in range(5)}


def test_selections_are_a_superset():
    """``amax`` and a ``where`` on a variable condition depend on every candidate, where
    torch.func sees only the chosen ones."""
    def f(x):
        return torch.cat([x.view(2, 3).amax(1), torch.where(x[:3] > x[3:], x[:3], x[3:])])
    args = (x_(6),)
    got = detected(f, args)
    assert dense_nonzeros(f, args) < got
    assert got == {(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)} | {
        (2 + i, j) for i in range(3) for j in (i, i + 3)}


HESSIAN_CASES = {
    "rosenbrock": (lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum(),
                   (x_(8),)),
    "broyden_banded": (lambda x: (banded(x) ** 2).sum(), (x_(9),)),
    "bratu_energy": (lambda u: 0.5 * (u * laplacian(u)).sum() - 2.0 * torch.exp(u).sum(),
                     (x_(5, 5),)),
    "gather_energy": (lambda x: element_energies(x).sum(), (x_(11),)),
    "pair_potential": (lambda x: (1 / (1 + (x[ELEMENTS[:, 0]] - x[ELEMENTS[:, 1]]) ** 2)).sum(),
                       (x_(11),)),
    "sparse_quadratic": (lambda x: x @ (SPARSE_MATRIX.T @ SPARSE_MATRIX @ x), (x_(6),)),
    "products_and_division": (lambda x: (x[:3] * x[3:6]).sum() + x[6] / x[7] + x[8] * 3,
                              (x_(9),)),
    "conv_residual_norm": (lambda u: (conv_residual(u) ** 2).sum(), (x_(10),)),
    "softmax_block": (lambda x: torch.log_softmax(x[:3], 0)[0] + x[3:].sum(), (x_(6),)),
    "matmul_variables": (lambda x: (x[:6].view(2, 3) @ x[6:].view(3, 2)).sum(), (x_(12),)),
    "conv_variable_weight": (lambda x: F.conv1d(x[3:].view(1, 1, 7), x[:3].view(1, 1, 3))
                             .sum(), (x_(10),)),
    "piecewise_linear": (lambda x: (torch.where(x > 0, x, 0.1 * x) + torch.relu(x[0] - x.flip(0))
                                    + x.view(2, 3).amax(1).repeat(3)).sum() + x[0] * x[1],
                         (x_(6),)),
    "mlp_dense": (lambda x: torch.tanh(torch.tanh(x.view(1, 5) @ W1) @ W3)
                  .sum(), (x_(5),)),
}


@pytest.mark.parametrize("name", list(HESSIAN_CASES))
def test_hessian_pattern_is_exact(name):
    f, args = HESSIAN_CASES[name]
    want = dense_nonzeros(f, args, order=2)
    assert want, "a reference of zeros proves nothing"
    assert detected_hessian(f, args) == want


def test_linear_function_has_no_hessian():
    def f(x):
        return (SPARSE_MATRIX @ x.flip(0)).sum() + torch.cumsum(x, 0).mean()
    assert detected_hessian(f, (x_(6),)) == set()


def test_powers_zero_and_one():
    def f(x):
        return (x[:3] ** 1 * 2 + x[3:] ** 0).sum() + x[0] * x[5]

    assert detected_hessian(f, (x_(6),)) == dense_nonzeros(f, (x_(6),), order=2) == {(0, 5),
                                                                                   (5, 0)}
    assert detected(f, (x_(6),)) == {(0, j) for j in range(6) if j not in (3, 4)}


def test_dense_interaction_blocks_stay_a_superset(monkeypatch):
    """Past ``MAX_SQUARE_PAIRS`` an op's interactions become the square of the union of its
    dependencies: more, never fewer."""
    import hod._sparsity
    f, args = HESSIAN_CASES["bratu_energy"]
    exact = detected_hessian(f, args)
    monkeypatch.setattr(hod._sparsity, "MAX_SQUARE_PAIRS", 0)
    blocked = detected_hessian(f, args)
    assert exact < blocked
    assert blocked == {(i, j) for i in range(25) for j in range(25)}


def test_hessian_needs_one_entry():
    gm, diff, n_out = traced(lambda x: x**2, (x_(3),))
    with pytest.raises(ValueError, match="one entry"):
        hessian_pattern(gm, diff, n_out)


def _stencil(n: int) -> set[tuple[int, int]]:
    """The 5-point stencil's pattern on an ``n x n`` grid, written out."""
    pairs = set()
    for i in range(n):
        for j in range(n):
            for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= i + di < n and 0 <= j + dj < n:
                    pairs.add((i * n + j, (i + di) * n + j + dj))
    return pairs


def test_ten_thousand_unknowns_in_seconds():
    """A 100 x 100 Bratu residual (S = 10,000, ~50k nonzeros): exact and fast."""
    u = x_(100, 100)
    gm, diff, n_out = traced(bratu, (u,))
    start = time.perf_counter()
    indices = jacobian_pattern(gm, diff, n_out)
    elapsed = time.perf_counter() - start
    assert as_set(indices) == _stencil(100)
    assert elapsed < 10.0  # about 0.02 s alone; generous for a shared machine


def _significant(matrix: torch.Tensor) -> set[tuple[int, int]]:
    """Entries above roundoff (a composite kernel may leave 1e-18 where the truth is 0)."""
    return as_set((matrix.abs() > 1e-12 * matrix.abs().max()).nonzero().t())


def _jacobian_matrix(f, sample: tuple, argnums: tuple[int, ...]) -> torch.Tensor:
    single = not isinstance(f(*sample), tuple)
    result = jacrev(f, argnums)(*sample)
    return _blocks((result,) if single else result, sample, argnums)


def _hessian_matrix(f, sample: tuple, argnums: tuple[int, ...]) -> torch.Tensor:
    blocks = jacfwd(jacrev(f, argnums), argnums)(*sample)
    return torch.cat([torch.cat([blocks[i][j].reshape(sample[a].numel(), sample[b].numel())
                                 for j, b in enumerate(argnums)], 1)
                      for i, a in enumerate(argnums)], 0)


@pytest.mark.parametrize("info", OPS, ids=[info.name for info in OPS])
def test_jacobian_never_sparser_than_torch_func_on_the_op_database(info):
    """Every op database entry, every sample: the detected Jacobian pattern holds every
    nonzero of torch.func's."""
    argnums = info.argnums if isinstance(info.argnums, tuple) else (info.argnums,)
    for sample in info.samples():
        gm, diff, n_out = traced(info.fn, sample, argnums)
        want = _significant(_jacobian_matrix(info.ref or info.fn, sample, argnums))
        assert want <= as_set(jacobian_pattern(gm, diff, n_out))


def _scalar(f):
    """``f``'s floating outputs through ``sin``, summed: a scalar that keeps their curvature
    and adds its own."""
    def scalar(*args):
        out = f(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return sum(torch.sin(o).sum() for o in outs if o.is_floating_point())

    return scalar


@pytest.mark.slow
@pytest.mark.parametrize("info", OPS, ids=[info.name for info in OPS])
def test_hessian_never_sparser_than_torch_func_on_the_op_database(info):
    argnums = info.argnums if isinstance(info.argnums, tuple) else (info.argnums,)
    for sample in info.samples():
        gm, diff, n_out = traced(_scalar(info.fn), sample, argnums)
        want = _significant(_hessian_matrix(_scalar(info.ref or info.fn), sample, argnums))
        assert want <= as_set(hessian_pattern(gm, diff, n_out))
