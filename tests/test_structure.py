"""The planner: batch-compressed seeds, the mode, and seed spans, checked against torch.func."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, reference
from models import tanh_mlp, weighted_seed_mlp

import hod
import hod._emitter
import hod._jet
from hod.rules import linalg

D = torch.float64


def per_sample_loss(X, W):
    return (torch.tanh(X @ W) ** 2).sum(1)


def mixes_rows(X, W):
    """Row b of the output depends on every row of X (a Gram matrix), so no compression."""
    return torch.sigmoid(X @ X.T @ X @ W).sum()


def batch_normalised(X):
    """Normalising over the batch couples the rows, but each feature column stays alone."""
    return torch.tanh((X - X.mean(0)) / (X.var(0) + 1.0).sqrt()).sum()


def globally_normalised(X):
    """Every entry depends on every other one."""
    return torch.tanh(X / X.norm()).sum()


@pytest.mark.parametrize("order", [2, 3])
def test_seed_mlp_hessian_compresses_the_batch(order):
    X, *Ps = torch.rand(6, 4, dtype=D), *[torch.randn(4, 4, dtype=D) for _ in range(3)]
    fn = hod.derivative(weighted_seed_mlp, order)
    lowered = fn.lower(X, *Ps)
    # order 2: local terms, the softmax's over seed pairs (hod._adjoint)
    assert lowered.mode == ("adjoint" if order == 2 else "reverse-last")
    assert lowered.seed_size == 4  # one seed per column, not per entry of X
    assert_same_tree(fn(X, *Ps), reference(weighted_seed_mlp, order)(X, *Ps))


def test_parameters_are_seeded_whole_next_to_a_compressed_batch():
    X, *Ps = torch.rand(5, 3, dtype=D), *[torch.randn(3, 3, dtype=D) for _ in range(2)]
    fn = hod.hessian(weighted_seed_mlp, (0, 1, 2))
    assert fn.lower(X, *Ps).seed_size == 3 + 9 + 9
    assert_same_tree(fn(X, *Ps), torch.func.hessian(weighted_seed_mlp, (0, 1, 2))(X, *Ps))


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_vector_output_goes_forward_with_compression(argnums):
    X, W = torch.rand(6, 3, dtype=D), torch.rand(3, 2, dtype=D)
    fn = hod.hessian(per_sample_loss, argnums)
    lowered = fn.lower(X, W)
    assert lowered.mode == "forward"
    assert lowered.seed_size == {0: 3, 1: 6, (0, 1): 9}[argnums]
    assert_same_tree(fn(X, W), reference(per_sample_loss, 2, argnums)(X, W))


@pytest.mark.parametrize("f, args", [
    (mixes_rows, (torch.rand(4, 3, dtype=D), torch.rand(3, 2, dtype=D))),
    (globally_normalised, (torch.rand(5, 3, dtype=D),)),
], ids=["gram", "global-norm"])
def test_coupled_rows_are_not_compressed(f, args):
    fn = hod.hessian(f)
    assert fn.lower(*args).seed_size == args[0].numel()
    assert_same_tree(fn(*args), torch.func.hessian(f)(*args))


def test_batch_norm_compresses_along_features():
    X = torch.rand(5, 3, dtype=D)
    fn = hod.hessian(batch_normalised)
    assert fn.lower(X).seed_size == 5  # one seed per row: the 3 columns are independent
    assert_same_tree(fn(X), torch.func.hessian(batch_normalised)(X))


def test_batch_along_a_later_dim():
    def column_sums(X):
        return (torch.sin(X) * X.cos()).sum(0)

    X = torch.rand(6, 5, dtype=D)
    fn = hod.hessian(column_sums)
    assert fn.lower(X).seed_size == 6  # columns are independent: one seed per row index
    assert_same_tree(fn(X), reference(column_sums, 2)(X))


def test_mixed_argument_order_reads_blocks_by_symmetry():
    X, *Ps = torch.rand(4, 3, dtype=D), *[torch.randn(3, 3, dtype=D) for _ in range(2)]

    def swapped(P1, X, P2):
        return weighted_seed_mlp(X, P1, P2)

    argnums = (2, 0, 1)
    assert_same_tree(
        hod.derivative(swapped, 3, argnums)(Ps[0], X, Ps[1]),
        reference(swapped, 3, argnums)(Ps[0], X, Ps[1]),
    )


def weights_both_sides(x, W, V):
    """A weight on the right of one product and (transposed) on the left of another."""
    return torch.tanh(torch.tanh(x @ W) @ V).sum() + torch.sin(W.T @ x.T).sum()


@pytest.mark.parametrize("order", [2, 3])
def test_products_with_weight_seeds_are_placements(order):
    """``x @ dW`` (and ``dW.T @ ...``, ``g @ dV.T`` in the gradient graph) place ``x`` on a
    diagonal instead of multiplying by an identity; non-square weights catch a mix-up of
    rows and columns."""
    x, W, V = torch.rand(3, 4, dtype=D), torch.rand(4, 6, dtype=D), torch.rand(6, 2, dtype=D)
    fn = hod.derivative(weights_both_sides, order, (0, 1, 2))
    assert "diag_embed" in fn.lower(x, W, V).code
    assert_same_tree(fn(x, W, V), reference(weights_both_sides, order, (0, 1, 2))(x, W, V))


def narrow_mlp(x, W, V):
    return torch.tanh(torch.tanh(x @ W) @ V).sum()


@pytest.mark.parametrize("order", [3, 4])
def test_narrow_products_run_on_block_diagonals(monkeypatch, order):
    """Stacked derivatives times a narrow weight (``D h @ V``) and a narrow input times
    stacked derivatives (``x.T @ D g``, a weight's gradient) run as one product with a
    block-diagonal or Kronecker matrix; non-square shapes catch a mix-up of rows, columns
    and the grouping of rows."""
    monkeypatch.setattr(linalg, "NARROW_MIN_ROWS", 64)
    x, W, V = torch.rand(4, 3, dtype=D), torch.rand(3, 5, dtype=D), torch.rand(5, 2, dtype=D)
    fn = hod.derivative(narrow_mlp, order, (0, 1, 2))
    code = fn.lower(x, W, V).code
    assert "block_diag" in code and "kron" in code
    assert_same_tree(fn(x, W, V), reference(narrow_mlp, order, (0, 1, 2))(x, W, V))


_PRODUCTS = {"mm", "bmm", "matmul", "einsum", "linear"}
_RESHAPES = {"view", "reshape", "permute", "expand", "constant_pad_nd", "slice"}


def _op(node) -> str:
    """The op's short name, whether the generated code calls ``torch.x`` or ``aten.x``."""
    return getattr(node.target, "__name__", "").split(".")[0]


def _reads_an_identity(node, sizes: set[int]) -> bool:
    """Whether ``node`` reads an identity matrix of one of ``sizes``, seen through views,
    slices, padding and scaling by a number."""
    return any(
        (_op(arg) == "eye" and arg.args[0] in sizes)
        or (_passes_on_identity(arg) and _reads_an_identity(arg, sizes))
        for arg in node.all_input_nodes
    )


def _passes_on_identity(node) -> bool:
    return _op(node) in _RESHAPES or (_op(node) == "mul" and len(node.all_input_nodes) == 1)


@pytest.mark.parametrize("order", [3, 4])
def test_cross_terms_with_weight_seeds_are_placements(order):
    """Leibniz cross terms ``D^j h @ dW`` (and ``dW.T @ D^j g``) take the weight's seeds
    over its own span and place ``D^j h`` on a diagonal: no matrix product reads an
    identity seed, padded or not."""
    x, W, V = torch.rand(3, 4, dtype=D), torch.rand(4, 6, dtype=D), torch.rand(6, 2, dtype=D)
    fn = hod.derivative(weights_both_sides, order, (0, 1, 2))
    graph = fn.lower(x, W, V).graph_module.graph
    products = [n for n in graph.nodes if _op(n) in _PRODUCTS]
    weight_seeds = {W.numel(), V.numel()}
    assert products and not [n.name for n in products if _reads_an_identity(n, weight_seeds)]
    assert_same_tree(fn(x, W, V), reference(weights_both_sides, order, (0, 1, 2))(x, W, V))


def logistic_loss(w, data, labels):
    """A vector leaf on the right of a matrix-vector product (traced as a row on the left)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(data @ w, labels)


def flat_parameter_net(theta, x):
    """A flat parameter vector split into a layer's weights, viewed as matrices."""
    w1, b1, w2 = theta.split([12, 4, 8])
    h = torch.tanh(torch.nn.functional.linear(x, w1.view(4, 3), b1))
    return torch.nn.functional.linear(h, w2.view(2, 4)).pow(2).sum()


@pytest.mark.parametrize(("f", "make_args", "seeds"), [
    (logistic_loss, lambda: (torch.randn(6), torch.randn(9, 6), torch.rand(9).round()), {6}),
    (flat_parameter_net, lambda: (torch.randn(24), torch.randn(5, 3)), {12, 8}),
], ids=["vector-leaf", "viewed-pieces"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_seeds_of_vectors_and_viewed_pieces_are_placed(f, make_args, seeds, dtype):
    """A vector leaf's seeds read as rows of a product, and a flat vector's pieces viewed as
    weight matrices, keep their identity structure: no matrix product reads their identity
    seeds, and the values are torch.func's."""
    args = cast(make_args(), dtype)
    fn = hod.hessian(f)
    graph = fn.lower(*args).graph_module.graph
    products = [n for n in graph.nodes if _op(n) in _PRODUCTS]
    assert products and not [n.name for n in products if _reads_an_identity(n, seeds)]
    rtol, atol = TOLERANCES[dtype]
    expected = cast(reference(f, 2, 0)(*cast(args, D)), dtype)
    assert_same_tree(fn(*args), expected, rtol=rtol, atol=atol)


def _node_count(fn, *args) -> int:
    return sum(1 for n in fn.lower(*args).graph_module.graph.nodes if n.op == "call_function")


def two_layers_vector(x, W, V):
    """A vector output: its derivatives are taken in forward mode."""
    return torch.tanh(torch.tanh(x @ W) @ V)


@pytest.mark.parametrize(("f", "order", "argnums"), [
    (weights_both_sides, 3, (0, 1, 2)), (weights_both_sides, 4, (0, 1, 2)),
    (weights_both_sides, 4, 0), (two_layers_vector, 3, (0, 2)), (two_layers_vector, 4, 1),
])
def test_top_order_is_computed_up_to_symmetry(monkeypatch, f, order, argnums):
    """One Faà di Bruno or Leibniz term per kind of placement at the top order, weighted,
    then one symmetrization: fewer ops than a term per placement, and the same values."""
    x, W, V = torch.rand(3, 4, dtype=D), torch.rand(4, 6, dtype=D), torch.rand(6, 2, dtype=D)
    expected = reference(f, order, argnums)(x, W, V)
    grouped = hod.derivative(f, order, argnums)
    grouped_nodes = _node_count(grouped, x, W, V)  # generated now, with the flag on
    monkeypatch.setattr(hod._jet, "GROUP_TOP_ORDER", False)
    every_placement = hod.derivative(f, order, argnums)
    assert grouped_nodes < _node_count(every_placement, x, W, V)
    assert_same_tree(every_placement(x, W, V), expected)
    monkeypatch.undo()
    assert_same_tree(grouped(x, W, V), expected)


@pytest.mark.parametrize(("f", "order", "argnums"), [
    (tanh_mlp, 2, (0, 1, 2)), (tanh_mlp, 3, (0, 1, 2)), (tanh_mlp, 4, (0, 2)),
    (weighted_seed_mlp, 2, (0, 1, 2)), (weighted_seed_mlp, 3, (0, 2)),
    (weighted_seed_mlp, 4, 0),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_placement_equals_torch_func(monkeypatch, f, order, argnums, dtype):
    """With the top order summed one term per placement (``GROUP_TOP_ORDER=False``, the
    plain Faà di Bruno and Leibniz sums) the values are torch.func's too."""
    args = (torch.randn(3, 4, dtype=D), torch.randn(4, 4, dtype=D), torch.randn(4, dtype=D),
            torch.randn(4, 2, dtype=D), torch.randn(2, dtype=D))
    if f is weighted_seed_mlp:
        args = (args[0].abs(), args[1], args[3])
    monkeypatch.setattr(hod._jet, "GROUP_TOP_ORDER", False)
    fn = hod.derivative(f, order, argnums)
    assert not hod._jet.DeriveContext(None, order, 1).grouped
    rtol, atol = TOLERANCES[dtype]
    expected = cast(reference(f, order, argnums)(*args), dtype)
    assert_same_tree(fn(*cast(args, dtype)), expected, rtol=rtol, atol=atol)


def linear_tanh_mlp(X, params):
    """Two ``nn.Linear``-style layers with biases (weights used transposed in addmm)."""
    T = torch.tanh(torch.nn.functional.linear(X, params["w1"], params["b1"]))
    return torch.nn.functional.linear(T, params["w2"], params["b2"]).pow(2).sum()


def scaled_output(X, W, s):
    """``s`` scales every entry: its gradient sums over all of them, not per example."""
    return (torch.tanh(X @ W) * s).sum()


def batch_in_columns(x, W):
    """The batch runs along x's columns: W's gradient is ``delta @ x.T``."""
    return torch.tanh(W @ x).sum()


def flattened_images(x, W):
    """A 3-d input flattened per example before the layer."""
    return torch.tanh(x.reshape(x.shape[0], -1) @ W).pow(2).sum()


def _linear_params():
    return {"w1": torch.randn(5, 4, dtype=D), "b1": torch.randn(5, dtype=D),
            "w2": torch.randn(3, 5, dtype=D), "b2": torch.randn(3, dtype=D)}


def _spied_per_example(monkeypatch, disabled: bool = False) -> Callable[[], tuple]:
    """A function giving the leaves that the reverse-last plan the planner kept reads
    per-example terms for (it prices every candidate plan, each with its terms)."""
    import hod._per_example
    import hod._plan

    prepared, kept = {}, []
    original_terms = hod._per_example.with_per_example_terms
    original_plan = hod._plan.plan_seeds

    def spy_terms(gm, diff_positions, seeds):
        result = (gm, seeds) if disabled else original_terms(gm, diff_positions, seeds)
        prepared[seeds] = result[1].per_example
        return result

    def spy_plan(*args, **kwargs):
        plan = original_plan(*args, **kwargs)
        kept.append(plan)
        return plan

    monkeypatch.setattr(hod._plan, "with_per_example_terms", spy_terms)
    monkeypatch.setattr(hod._plan, "plan_seeds", spy_plan)
    return lambda: prepared[kept[-1]]


@pytest.mark.parametrize("f, args, argnums, expected", [
    (weighted_seed_mlp,
     (torch.rand(4, 6, dtype=D), *[torch.randn(6, 6, dtype=D) for _ in range(3)]),
     (0, 1, 2, 3), (1, 2, 3)),
    (linear_tanh_mlp, (torch.rand(6, 4, dtype=D), _linear_params()), (0, 1), (1, 2, 3, 4)),
    (batch_in_columns, (torch.rand(4, 7, dtype=D), torch.randn(5, 4, dtype=D)), (0, 1), (1,)),
    (flattened_images, (torch.rand(5, 2, 3, dtype=D), torch.randn(6, 4, dtype=D)), (0, 1),
     (1,)),
    (scaled_output, (torch.rand(4, 3, dtype=D), torch.randn(3, 3, dtype=D),
                     torch.tensor(1.5, dtype=D)), (0, 1, 2), ()),
])
def test_input_weight_blocks_come_from_per_example_terms(monkeypatch, f, args, argnums,
                                                          expected):
    seen = _spied_per_example(monkeypatch)
    fn = hod.hessian(f, argnums)
    assert_same_tree(fn(*args), reference(f, 2, argnums)(*args))
    assert seen() == expected  # every weight's gradient is a batch sum, or none is read so


def test_per_example_terms_keep_weight_seeds_out_of_the_input_gradient(monkeypatch):
    """The reverse sweep's last product (back to X) carries X's seeds only: no tensor of
    shape ``(S,) + X.shape`` over the whole seed space is left in the generated code (X's
    width differs from the layers', so no other value has X's shape)."""
    X, *Ps = torch.rand(4, 5, dtype=D), torch.randn(5, 6, dtype=D), torch.randn(6, 6, dtype=D)

    def full_width_nodes(disabled: bool) -> int:
        _spied_per_example(monkeypatch, disabled)
        lowered = hod.hessian(weighted_seed_mlp, (0, 1, 2)).lower(X, *Ps)
        full = (lowered.seed_size, *X.shape)
        return sum(tuple(n.meta["val"].shape) == full
                   for n in lowered.graph_module.graph.nodes
                   if isinstance(n.meta.get("val"), torch.Tensor))

    assert full_width_nodes(disabled=True) > 0
    assert full_width_nodes(disabled=False) == 0


def test_planner_prices_plans_by_work_not_seed_count():
    """A tanh MLP's Hessian (the input scaled first, so that the first layer is not split
    off) can compress the batch of X (50 + 3 * 2500 = 7550 seeds) or the last layer's
    independent columns (500 + 2 * 2500 + 50 = 5550). The smaller seed space is the slower
    plan (measured in float32: 62-65 ms against 54-60 ms): every weight's gradient then
    needs both Leibniz products over all seeds, which the cost model counts.
    """
    X, *Ps = torch.rand(10, 50), *[torch.randn(50, 50) / 7 for _ in range(3)]

    def tanh_mlp(X, *Ps):
        X = 2 * X
        for P in Ps:
            X = torch.tanh(X @ P)
        return X.sum()

    assert hod.hessian(tanh_mlp, (0, 1, 2, 3)).lower(X, *Ps).seed_size == 50 + 3 * 2500


def test_planner_counts_cross_terms_with_compressed_weights():
    """Order 3 of a tanh MLP over a batch of 2 can compress the batch of X (4 + 16 + 16 =
    36 seeds) or the last layer's columns (8 + 16 + 4 = 28). With the columns compressed,
    the last weight's seeds are no identity: every cross term ``D^2 h @ dW`` is a dense
    product whose seed axes come out interleaved with the value dims (measured here in
    float32: 0.63 ms against 0.50 ms for the batch plan; 8.4 against 5.1 ms at order 4).
    The cost model counts those cross terms and so compresses the batch."""
    X, *Ps = torch.rand(2, 4, dtype=D), *[torch.randn(4, 4, dtype=D) for _ in range(2)]

    def tanh_mlp(X, *Ps):
        for P in Ps:
            X = torch.tanh(X @ P)
        return X.sum()

    fn = hod.derivative(tanh_mlp, 3, (0, 1, 2))
    assert fn.lower(X, *Ps).seed_size == 4 + 16 + 16
    assert_same_tree(fn(X, *Ps), reference(tanh_mlp, 3, (0, 1, 2))(X, *Ps))


def softmax_mlp(x, W, V):
    return torch.softmax(torch.tanh(x @ W) @ V, dim=1).pow(2).sum()


@pytest.mark.parametrize("order", [2, 3])
def test_short_last_dims_are_spread_and_summed_by_products(monkeypatch, order):
    """Large products with an operand broadcast along a short last dim spread that
    operand over its trailing dims first, and large sums over a short last dim (softmax's
    normaliser) run as a product with ones; non-square shapes catch a wrong spread."""
    monkeypatch.setattr(hod._emitter, "WIDEN_MIN_ENTRIES", 64)
    monkeypatch.setattr(hod._emitter, "WIDEN_MIN_SHORT_ENTRIES", 64)
    x, W, V = torch.rand(3, 4, dtype=D), torch.rand(4, 5, dtype=D), torch.rand(5, 2, dtype=D)
    fn = hod.derivative(softmax_mlp, order, (0, 1, 2))
    graph = fn.lower(x, W, V).graph_module.graph
    assert {"mv", "clone"} <= {_op(n) for n in graph.nodes}
    assert_same_tree(fn(x, W, V), reference(softmax_mlp, order, (0, 1, 2))(x, W, V))


def test_operands_broadcast_just_before_a_short_run_are_spread(monkeypatch):
    """``(4, 1) * (S, S, S, 4, 1)`` runs 4 entries at a time: the small operand is spread
    over the broadcast dims before the run first (a non-square batch catches a wrong
    spread); a product broadcast along neither is left alone."""
    monkeypatch.setattr(hod._emitter, "WIDEN_MIN_ENTRIES", 64)
    em = hod._emitter.Emitter(torch.device("cpu"), D)
    small = em.placeholder("small", torch.rand(3, 1, dtype=D))
    large = em.placeholder("large", torch.rand(5, 6, 7, 3, 1, dtype=D))
    same = em.placeholder("same", torch.rand(5, 6, 7, 3, 1, dtype=D))
    em.output([em.mul(small, large), em.mul(large, same)])
    clones = [n for n in em.graph.nodes if _op(n) == "clone"]
    assert len(clones) == 1 and clones[0].meta["val"].shape[-3:] == (7, 3, 1)
    args = [torch.rand(3, 1, dtype=D), torch.rand(5, 6, 7, 3, 1, dtype=D),
            torch.rand(5, 6, 7, 3, 1, dtype=D)]
    product, plain = torch.fx.GraphModule(torch.nn.Module(), em.graph)(*args)
    assert_same_tree(product, args[0] * args[1])
    assert_same_tree(plain, args[1] * args[2])


def test_compiled_code_keeps_einsum_for_wider_narrow_products(monkeypatch):
    """A weight's gradient ``x.T @ D delta`` with 8 columns goes through a Kronecker
    product in eager code but stays an ``einsum`` in code meant for torch.compile (see
    ``hod.rules.linalg._narrow_left``); both are right."""
    monkeypatch.setattr(linalg, "NARROW_MIN_ROWS", 64)
    x, W, V = torch.rand(4, 3, dtype=D), torch.rand(3, 8, dtype=D), torch.rand(8, 8, dtype=D)
    expected = reference(narrow_mlp, 3, (0, 1, 2))(x, W, V)
    for compile, kron in ((None, True), ({"backend": "aot_eager"}, False)):
        fn = hod.derivative(narrow_mlp, 3, (0, 1, 2), compile=compile)
        ops = {_op(n) for n in fn.lower(x, W, V).graph_module.graph.nodes}
        assert ("kron" in ops) == kron
        assert_same_tree(fn(x, W, V), expected)


def sine_minus_cosine(x):
    return torch.sin(x) - torch.cos(x)


def test_adding_a_negation_is_a_subtraction():
    """The rule for ``a - b`` adds ``a`` and ``-b``; the emitter writes ``a + neg(b)`` (and
    ``a + b * -1``) as ``a - b``: one op instead of two, the same bits (or, where ``b`` is a
    product read only there, one ``addcmul``)."""
    x = torch.rand(5, dtype=D)
    fn = hod.derivative(sine_minus_cosine, 2)
    ops = [_op(n) for n in fn.lower(x).graph_module.graph.nodes]
    assert ("sub" in ops or "addcmul" in ops) and "neg" not in ops
    assert_same_tree(fn(x), reference(sine_minus_cosine, 2)(x))



@pytest.mark.parametrize("order", [3, 4])
def test_products_are_made_once_and_like_terms_added_as_one(order):
    """The rule for tanh's derivative multiplies ``y * y'`` and ``y' * y``: one node. Terms
    that scale one node are summed as one scaled term: no ``x + x``, no ``x*c + x``."""
    args = (torch.rand(2, 3, dtype=D), torch.rand(3, 4, dtype=D), torch.rand(4, dtype=D),
            torch.rand(4, 2, dtype=D), torch.rand(2, dtype=D))
    fn = hod.derivative(tanh_mlp, order, (0, 1))
    nodes = [n for n in fn.lower(*args).graph_module.graph.nodes if n.op == "call_function"]
    products = [tuple(n.args) for n in nodes if _op(n) == "mul"]
    assert len(products) > 10
    assert not any(a[::-1] in products for a in products if a != a[::-1])

    def base(x):
        if _op(x) == "mul" and type(x.args[1]) in (int, float):
            return x.args[0]
        return x

    for n in nodes:
        if _op(n) == "add" and all(isinstance(a, torch.fx.Node) for a in n.args):
            assert base(n.args[0]) is not base(n.args[1])
    assert_same_tree(fn(*args), reference(tanh_mlp, order, (0, 1))(*args))


@pytest.mark.parametrize("stack,einsum", [((300, 48, 16), False), ((300, 8, 16), True),
                                          ((300, 16, 48), True)])
def test_a_matrix_times_a_contiguous_stack_of_large_matrices_is_one_matmul(stack, einsum):
    """``a (1, k) @ b (B, k, n)``: einsum would copy a contiguous ``b`` into a layout it can
    fold, so stacks of at least ``STACKED_MIN_ENTRIES``-entry matrices stay with matmul;
    smaller ones (and a transposed stack, third case) are folded by einsum."""
    from hod._emitter import Emitter
    from hod.rules.linalg import _needs_einsum

    em = Emitter(torch.device("cpu"), D)
    b = torch.rand(stack, dtype=D)
    if stack[-1] > stack[-2]:
        b = torch.rand(stack[0], stack[2], stack[1], dtype=D).transpose(1, 2)
    a_node = em.placeholder("a", torch.rand(1, b.shape[1], dtype=D))
    b_node = em.placeholder("b", b)
    assert _needs_einsum(em, a_node, b_node) is einsum
