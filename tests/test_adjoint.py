"""Hessians of scalars summed from their curved nodes' local terms (``hod._adjoint``):
each case checks that the adjoint mode ran (``.lower().mode``) and equals torch.func in
float64; cases outside its reach take reverse-last mode and are right too."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, layer, reference, scaled_weights
from torch.func import functional_call, hessian, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import hod
import hod._adjoint

D = torch.float64



W1, W2, W3 = scaled_weights(3, 96, 96, 1)



def tanh_net(x):
    return layer(torch.tanh(layer(torch.tanh(layer(x, W1)), W2)), W3).sum()


def products(x):
    """Elementwise products of two tracked tensors, a quotient, a power and a select,
    between wide products."""
    h = torch.sigmoid(layer(torch.tanh(layer(x, W1)), W2))
    g = torch.sin(layer(x, W1))
    return (h * g / (1.5 + g * g)).pow(3).sum() + torch.where(h > 0.5, h, g).sum()


def scaled(x, s):
    """Two differentiated arguments, multiplied together."""
    return torch.nn.functional.softplus(layer(torch.tanh(layer(x, W1) * s), W2)).sum()


W_IN, W_OUT = scaled_weights(64, 32, 10)
(W_LOGITS,) = scaled_weights(96, 10)
LABEL = torch.tensor([3])


def classifier(x):
    """relu layers and a cross-entropy: f bends only at the log-softmax of 10 logits, so
    with 64 seeds its logits' derivatives come from 10 reverse sweeps."""
    logits = layer(torch.relu(layer(x, W_IN)), W_OUT).reshape(1, 10)
    return torch.nn.functional.cross_entropy(logits, LABEL)


W_WIDE, W_HIDDEN = scaled_weights(200, 16, 10)


def two_bends(x):
    """Bends at 16 tanh entries and 10 logits: 26 reverse sweeps for 200 seeds."""
    logits = layer(torch.tanh(layer(x, W_WIDE)), W_HIDDEN).reshape(1, 10)
    return torch.nn.functional.cross_entropy(logits, LABEL)


def small_classifier(x):
    """Three seeds, ten logits: the log-softmax's local term over seed pairs."""
    logits = layer(torch.tanh(layer(x, W1)), W_LOGITS).reshape(1, 10)
    return torch.nn.functional.cross_entropy(logits, LABEL)


torch.manual_seed(7)
DATA, DATA_2 = torch.randn(60, 8, dtype=D), torch.randn(40, 8, dtype=D)
LABELS = (torch.rand(60, dtype=D) < 0.5).to(D)


def logistic(w):
    """A GLM's loss: a chain of elementwise ops of ``X w`` (separable in its 60 entries),
    whose local terms sum to one contraction with the chain's Hessian diagonal."""
    return torch.nn.functional.binary_cross_entropy_with_logits(layer(DATA, w.unsqueeze(1))
                                                                .squeeze(1), LABELS)


def two_roots(w):
    """Two separable chains of two products of ``w``: no term between them."""
    return (torch.nn.functional.softplus(layer(DATA, w.unsqueeze(1))).sum()
            + torch.tanh(layer(DATA_2, w.unsqueeze(1))).pow(2).mean())


WQ, WK, WV = scaled_weights(12, 12, 12, 12)


def self_attention(x):
    """Softmax attention over 8 tokens of a 96-entry layer: ``Q K^T`` and ``P V`` are
    products of two tracked matrices (``mm``), each with its bilinear local term."""
    h = torch.tanh(layer(x, W1)).reshape(8, 12)
    q, k, v = layer(h, WQ), layer(h, WK), layer(h, WV)
    p = torch.softmax(q @ k.T / 12**0.5, dim=-1)
    return torch.tanh(p @ v).sum()


def heads(x):
    """Two heads as stacked matrices (``bmm``), a log-softmax between them."""
    h = torch.tanh(layer(x, W1)).reshape(2, 8, 6)
    scores = torch.bmm(h, torch.sin(h).transpose(1, 2))
    return torch.bmm(torch.log_softmax(scores, -1), h).pow(2).sum()


def broadcast_matmul(x):
    """``matmul`` broadcasting batch dims, ``(2, 1, 4, 6) @ (1, 2, 6, 4)``."""
    h = torch.tanh(layer(x, W1))
    return torch.sin(h[:48].reshape(2, 1, 4, 6) @ h[48:].reshape(1, 2, 6, 4)).sum()


def vectors(x):
    """``dot`` and ``mv`` of tracked vectors, and an ``addmm`` scaled by ``alpha``."""
    h = torch.tanh(layer(x, W1))
    a = h[:48].reshape(8, 6)
    return (torch.dot(h[:48], h[48:]).sin() + torch.mv(a, h[90:]).exp().sum()
            + torch.addmm(h[:6], a, a.T[:, :6], alpha=0.5).cos().sum())


def products_along_rows(x):
    """``cumprod`` and ``prod`` along rows of a layer (traced as chains of products of
    tracked factors, one local term each)."""
    h = torch.tanh(layer(x, W1)).reshape(8, 12)
    return torch.cumprod(h, 1).pow(2).sum() + torch.prod(h[:, :6] + 1.5, 1).sum()


CASES = {
    "logistic": (logistic, 0, lambda: (0.3 * torch.randn(8, dtype=D),)),
    "two_roots": (two_roots, 0, lambda: (0.3 * torch.randn(8, dtype=D),)),
    "classifier": (classifier, 0, lambda: (torch.randn(64, dtype=D),)),
    "small_classifier": (small_classifier, 0, lambda: (torch.randn(3, dtype=D),)),
    "two_bends": (two_bends, 0, lambda: (torch.randn(200, dtype=D),)),
    "tanh_net": (tanh_net, 0, lambda: (torch.randn(3, dtype=D),)),
    "products": (products, 0, lambda: (torch.randn(3, dtype=D),)),
    "scaled": (scaled, (0, 1), lambda: (torch.randn(3, dtype=D), torch.rand(1, dtype=D))),
    "self_attention": (self_attention, 0, lambda: (torch.randn(3, dtype=D),)),
    "heads": (heads, 0, lambda: (torch.randn(3, dtype=D),)),
    "broadcast_matmul": (broadcast_matmul, 0, lambda: (torch.randn(3, dtype=D),)),
    "vectors": (vectors, 0, lambda: (torch.randn(3, dtype=D),)),
    "products_along_rows": (products_along_rows, 0, lambda: (torch.randn(3, dtype=D),)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_hessian_by_local_terms(case, dtype):
    f, argnums, make = CASES[case]
    args = make()
    fn = hod.hessian(f, argnums)
    typed = cast(args, dtype)
    assert fn.lower(*typed).mode == "adjoint"
    assert_same_tree(fn(*typed), cast(reference(f, 2, argnums)(*args), dtype),
                     *TOLERANCES[dtype])


def coupled_tail(w):
    """Entries of ``X w`` meeting again after their chain (``tanh(z) * sum(tanh(z))``): not
    separable, so each curved node keeps its own term."""
    t = torch.tanh(layer(DATA, w.unsqueeze(1)))
    return (torch.exp(t) * t.sum()).sum()


def test_a_tail_that_is_not_separable_keeps_its_terms():
    w = 0.3 * torch.randn(8, dtype=D)
    assert_same_tree(hod.hessian(coupled_tail)(w), hessian(coupled_tail)(w))


def per_example_logistic(x):
    return torch.nn.functional.binary_cross_entropy_with_logits(DATA[:, :3] @ x, LABELS)


@pytest.mark.parametrize("f", [tanh_net, small_classifier, per_example_logistic, heads],
                         ids=lambda f: f.__name__)
def test_per_example_hessians_under_vmap(f):
    X = torch.randn(5, 3, dtype=D)
    fn = hod.hessian(f)
    box = []
    actual = vmap(lambda x: (box.append(fn.lower(x)), fn(x))[1])(X)
    assert box[0].mode == "adjoint" and box[0].examples == 5
    assert_same_tree(actual, vmap(hessian(f))(X))


def test_has_aux_and_pytree_argument():
    def f(p):
        y = (torch.tanh(layer(torch.tanh(p["x"] @ W1), W2)) * p["s"]).sum()
        return y, {"y": y}

    p = {"x": torch.randn(3, dtype=D), "s": torch.randn(1, dtype=D)}
    fn = hod.hessian(f, has_aux=True)
    assert fn.lower(p).mode == "adjoint"
    assert_same_tree(fn(p), reference(f, 2, has_aux=True)(p))


@pytest.mark.parametrize("name", ["logsumexp", "convolution_of_tracked_tensors", "wide_input"])
def test_outside_its_reach_reverse_last_runs(name):
    """A node neither elementwise nor linear in its tracked inputs (logsumexp, a tracked
    signal convolved with a tracked kernel), or seeds too many for the work they save (400
    seeds through elementwise layers that mix the entries: local terms of 400^2 per entry),
    take reverse-last mode."""
    f, x = {
        "logsumexp": (lambda x: torch.logsumexp((x @ W1).reshape(8, 12), 1).pow(2).sum(),
                      torch.randn(3, dtype=D)),
        "convolution_of_tracked_tensors": (
            lambda x: torch.tanh(torch.conv1d(x[:8].reshape(1, 1, 8), x[8:].reshape(1, 1, 3))
                                 ).sum(), torch.randn(11, dtype=D)),
        "wide_input": (lambda x: torch.tanh(x.sum() * x).sum(), torch.randn(400, dtype=D)),
    }[name]
    fn = hod.hessian(f)
    assert fn.lower(x).mode == "reverse-last"
    assert_same_tree(fn(x), hessian(f)(x))


@pytest.mark.parametrize("case", ["tanh_net", "scaled", "self_attention"])
def test_value_gradient_and_hessian_from_one_sweep(case):
    """``hod.derivatives(f, 2)``: the gradient is the adjoint of the differentiated
    leaves, from the same reverse sweep as the curved nodes' adjoints."""
    f, argnums, make = CASES[case]
    args = make()
    fn = hod.derivatives(f, 2, argnums)
    assert fn.lower(*args).mode == "adjoint"
    expected = (f(*args), reference(f, 1, argnums)(*args), reference(f, 2, argnums)(*args))
    assert_same_tree(fn(*args), expected)


def test_value_gradient_and_hessian_per_example():
    X = torch.randn(4, 3, dtype=D)
    fn = hod.derivatives(tanh_net, 2)
    box = []
    actual = vmap(lambda x: (box.append(fn.lower(x)), fn(x))[1])(X)
    assert box[0].mode == "adjoint"
    expected = (vmap(tanh_net)(X), vmap(reference(tanh_net, 1))(X), vmap(hessian(tanh_net))(X))
    assert_same_tree(actual, expected)


def rows_net(X):
    """Independent rows, summed: the Hessian is block diagonal over the batch."""
    return layer(torch.tanh(layer(torch.tanh(layer(X, W1)), W2)), W3).sum()


@pytest.mark.parametrize("transform", ["hessian", "derivatives"])
def test_a_batch_of_independent_rows_is_seeded_per_row(transform):
    """Seeds of one row (3, not 12): the local terms are summed per row and placed on the
    batch diagonal."""
    X = torch.randn(4, 3, dtype=D)
    fn = hod.hessian(rows_net) if transform == "hessian" else hod.derivatives(rows_net, 2)
    lowered = fn.lower(X)
    assert lowered.mode == "adjoint" and lowered.seed_size == 3
    H = hessian(rows_net)(X)
    expected = H if transform == "hessian" else (rows_net(X), reference(rows_net, 1)(X), H)
    assert_same_tree(fn(X), expected)


W_BEND, W_GRAM = scaled_weights(200, 4, 4)


def bends_at_a_product(x):
    """200 seeds, bending at 4 tanh entries and a product of two tracked 2 x 2 matrices:
    their 12 entries' derivatives come from reverse sweeps."""
    h = torch.tanh(layer(x, W_BEND)).reshape(2, 2)
    return torch.sin(h @ layer(h.reshape(4), W_GRAM).reshape(2, 2).T).sum()


def test_a_product_of_tracked_matrices_where_few_entries_bend():
    x = torch.randn(200, dtype=D)
    fn = hod.hessian(bends_at_a_product)
    assert fn.lower(x).mode == "adjoint"
    assert_same_tree(fn(x), hessian(bends_at_a_product)(x))


def _attention_modules():
    """A transformer layer's loss w.r.t. its input (24 seeds) and self-attention's w.r.t.
    its parameters as one vector (80 seeds), in eval mode, with the math attention kernel
    (the fused one has no second derivative)."""
    torch.manual_seed(3)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 8, dropout=0.0, batch_first=True).eval()
    attention = torch.nn.MultiheadAttention(4, 2, batch_first=True)
    layers = {dtype: copy.deepcopy(layer).to(dtype) for dtype in (torch.float64, torch.float32)}
    attentions = {dtype: copy.deepcopy(attention).to(dtype)
                  for dtype in (torch.float64, torch.float32)}
    target = torch.randn(1, 3, 8, dtype=D)
    shapes = {k: v.shape for k, v in attention.named_parameters()}
    tokens = torch.randn(1, 3, 4, dtype=D)

    def encoder(x):
        with sdpa_kernel(SDPBackend.MATH):
            return (layers[x.dtype](x) - target.to(x.dtype)).pow(2).mean()

    def attention_of_params(flat):
        params, at = {}, 0
        for name, shape in shapes.items():
            params[name] = flat[at:at + shape.numel()].reshape(shape)
            at += shape.numel()
        x = tokens.to(flat.dtype)
        with sdpa_kernel(SDPBackend.MATH):
            out = functional_call(attentions[flat.dtype], params, (x, x, x))[0]
        return out.pow(2).mean()

    flat = torch.cat([p.detach().reshape(-1) for p in attention.parameters()]).to(D)
    return {"transformer_layer": (encoder, torch.randn(1, 3, 8, dtype=D)),
            "attention_parameters": (attention_of_params, flat)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["transformer_layer", "attention_parameters"])
def test_attention_modules_by_local_terms(name, dtype, monkeypatch):
    """The zoo's attention rows at small sizes, in adjoint mode whatever the cost model
    says (it picks reverse-last there): products of tracked matrices, softmax, layer norm's
    products and square roots, each by its local term."""
    monkeypatch.setattr(hod._adjoint, "_pays", lambda *args: True)
    f, x = _attention_modules()[name]
    fn = hod.hessian(f)
    assert fn.lower(x.to(dtype)).mode == "adjoint"
    assert_same_tree(fn(x.to(dtype)), cast(reference(f, 2)(x), dtype), *TOLERANCES[dtype])
