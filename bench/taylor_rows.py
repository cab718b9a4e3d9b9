"""The rows of the ``taylor`` sweep: their models, inputs, float64 references and matmul floors.

Every row is a :class:`TaylorRow`; its model is a tanh MLP ``mlp(X, *params)`` with biases
(``params = (W1, b1, W2, b2, ...)``, ``W_l`` of shape ``(in, out)``, tanh after every layer but
the last), applied to a batch ``X`` of shape ``(batch, D)``; rows of ``X`` are independent. Kinds:

* ``laplacian``: the per-datum Laplacian ``sum_i d2 u(x_b) / dx_i2`` of ``u = mlp``, shape
  ``(batch,)``;
* ``biharmonic``: the per-datum ``sum_ij d4 u / dx_i2 dx_j2``, shape ``(batch,)``;
* ``stochastic``: the per-datum Hutchinson estimate ``(1/S) sum_s v_bs^T H_b v_bs`` with
  Rademacher directions of shape ``(batch, S, D)``. jet-for-pytorch and hod draw their own from
  a seed and take none from outside, so the harness reproduces both draws from the row's seed
  (:data:`DIRECTIONS`), checks each engine against the float64 estimate with its own
  directions, and feeds jet's directions to torch.func;
* ``hvp``: ``H v`` of the loss ``mean((mlp(X, *unflatten(theta)) - Y)^2)`` w.r.t. one flat
  parameter vector ``theta``, shape ``(P,)``;
* ``pinn``: one PINN step: the loss ``mean((lap u(x_b) - s(x_b))^2)`` with the source
  ``s(x) = sum_i sin(x_i)``, and its gradient w.r.t. every parameter (autograd).

Results are compared as :data:`bench.compare.Blocks`: ``{(0,): tensor}``, and for the PINN step
``{(0,): loss (1,), (1,): grad of params[0], ...}``. This module needs torch only, so that the
jet-for-pytorch worker (another interpreter) imports it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.func import grad, hessian, jvp, vmap

Blocks = dict[tuple[int, ...], Tensor]

#: The MLP of the jet-for-pytorch paper's Laplacian benchmark (Dangel et al., 2025).
PAPER_SIZES = (50, 768, 768, 512, 512, 1)


@dataclass(frozen=True)
class TaylorRow:
    """One row of the taylor sweep: ``kind`` (module docstring), the MLP's layer ``sizes``
    (``sizes[0]`` = D), the batch, and ``samples`` (S, stochastic rows only)."""

    kind: str
    sizes: tuple[int, ...]
    batch: int
    samples: int = 0

    @property
    def dim(self) -> int:
        return self.sizes[0]

    def label(self) -> str:
        """E.g. ``laplacian D50 b32``, ``stochastic S16 D50 b32``, ``hvp P1052298 b128``."""
        if self.kind == "hvp":
            return f"hvp P{n_parameters(self.sizes)} b{self.batch}"
        samples = f" S{self.samples}" if self.samples else ""
        return f"{self.kind}{samples} D{self.dim} b{self.batch}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TaylorRow:
        fields = dict(data)
        fields["sizes"] = tuple(fields["sizes"])
        return cls(**fields)


TAYLOR_ROWS: tuple[TaylorRow, ...] = (
    TaylorRow("laplacian", PAPER_SIZES, 32),
    TaylorRow("laplacian", PAPER_SIZES, 128),
    TaylorRow("biharmonic", (5, 64, 64, 1), 32),
    TaylorRow("stochastic", PAPER_SIZES, 32, samples=16),
    TaylorRow("hvp", (64, 1024, 768, 256, 10), 128),
    TaylorRow("pinn", PAPER_SIZES, 32),
)


def n_parameters(sizes: tuple[int, ...]) -> int:
    """Weights and biases of the MLP with layer sizes ``sizes``."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


# --- the model -------------------------------------------------------------------------------

def mlp(X: Tensor, *params: Tensor) -> Tensor:
    """tanh MLP: ``(batch, D) -> (batch, out)``; ``params = (W1, b1, ...)``, no tanh at the end."""
    h = X
    layers = len(params) // 2
    for i in range(layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < layers - 1:
            h = torch.tanh(h)
    return h


def per_datum(params: tuple[Tensor, ...]) -> Callable[[Tensor], Tensor]:
    """``x (D,) -> u(x)`` scalar: the MLP on one datum (params captured)."""

    def u(x: Tensor) -> Tensor:
        return mlp(x.unsqueeze(0), *params).reshape(())

    return u


def param_shapes(sizes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of ``(W1, b1, W2, b2, ...)``."""
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        shapes += [(a, b), (b,)]
    return shapes


def unflatten(theta: Tensor, sizes: tuple[int, ...]) -> list[Tensor]:
    """Views of the flat parameter vector ``theta`` (P,) as ``(W1, b1, ...)``."""
    out, start = [], 0
    for shape in param_shapes(sizes):
        n = math.prod(shape)
        out.append(theta[start:start + n].view(shape))
        start += n
    return out


def hvp_loss(sizes: tuple[int, ...]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``loss(theta, X, Y) = mean((mlp(X, *unflatten(theta)) - Y)^2)``, a scalar."""

    def loss(theta: Tensor, X: Tensor, Y: Tensor) -> Tensor:
        return (mlp(X, *unflatten(theta, sizes)) - Y).square().mean()

    return loss


def source(X: Tensor) -> Tensor:
    """The PINN row's right-hand side ``s(x) = sum_i sin(x_i)``: ``(batch, D) -> (batch,)``."""
    return torch.sin(X).sum(-1)


def pinn_loss(lap: Tensor, s: Tensor) -> Tensor:
    """``mean((lap u - s)^2)`` from the per-datum Laplacians (any shape with batch entries)."""
    return (lap.reshape(-1) - s).square().mean()


# --- inputs ----------------------------------------------------------------------------------

def rademacher_directions(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Rademacher entries drawn from torch's global generator seeded with ``seed``, as
    ``jet.utils.rademacher`` draws them (``empty(shape).fill_(0.5).bernoulli() * 2 - 1``); drawn
    once for the shape ``(batch, S, D)``, they are the directions that jet-for-pytorch's
    randomized Laplacian vmapped over the batch (``randomness="different"``) draws after
    ``torch.manual_seed(seed)`` (checked by the harness: its result must match them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.empty(shape, dtype=dtype).fill_(0.5).bernoulli().mul_(2).sub_(1)


def hod_directions(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The Rademacher directions ``(batch, S, D)`` that ``hod.laplacian(samples=S,
    generator=torch.Generator().manual_seed(seed))`` draws for a ``(batch, D)`` input, as
    hod/_series.py draws them (``2 * randint(0, 2, (S, batch, D)) - 1``), moved to the
    ``(batch, S, D)`` layout; should hod draw otherwise, its check fails."""
    batch, samples, dim = shape
    bits = torch.randint(0, 2, (samples, batch, dim), generator=torch.Generator().manual_seed(seed))
    return (2 * bits - 1).to(dtype).transpose(0, 1).contiguous()


#: The stochastic row's direction sets: ``V`` as jet-for-pytorch draws them (also fed to
#: torch.func), ``V_hod`` as hod draws them (each engine's draw cannot be handed to the other).
DIRECTIONS = {"V": rademacher_directions, "V_hod": hod_directions}


def make_inputs(row: TaylorRow, seed: int) -> dict[str, Tensor]:
    """The row's float32 CPU inputs, reproducible from ``seed``.

    Always ``X`` (batch, D) uniform in [-1, 1] and ``params`` (a tuple, Glorot-uniform weights,
    biases uniform in [-0.1, 0.1]); ``hvp`` rows also ``theta`` (the params flattened), ``Y``
    (batch, out) and ``v`` (P,) normal; ``stochastic`` rows a ``direction_seed`` and the
    directions of :data:`DIRECTIONS` drawn from it, each (batch, S, D); ``pinn`` rows ``s`` =
    :func:`source` of X.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, bound: float) -> Tensor:
        return (2 * torch.rand(*shape, generator=gen) - 1) * bound

    params = []
    for a, b in zip(row.sizes[:-1], row.sizes[1:], strict=False):
        params += [uniform(a, b, bound=math.sqrt(6.0 / (a + b))), uniform(b, bound=0.1)]
    X = uniform(row.batch, row.dim, bound=1.0)
    inputs: dict[str, Tensor | tuple[Tensor, ...]] = {"X": X, "params": tuple(params)}
    if row.kind == "hvp":
        inputs["theta"] = torch.cat([p.reshape(-1) for p in params])
        inputs["Y"] = torch.randn(row.batch, row.sizes[-1], generator=gen)
        inputs["v"] = torch.randn(inputs["theta"].numel(), generator=gen)
    if row.kind == "stochastic":
        direction_seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
        inputs["direction_seed"] = torch.tensor(direction_seed)
        for name, draw in DIRECTIONS.items():
            inputs[name] = draw(direction_seed, (row.batch, row.samples, row.dim), torch.float32)
    if row.kind == "pinn":
        inputs["s"] = source(X)
    return inputs


def to_double(inputs: dict[str, object]) -> dict[str, object]:
    """The inputs with every floating tensor cast to float64 (tuples of tensors too)."""
    def cast(t: object) -> object:
        if isinstance(t, tuple):
            return tuple(cast(x) for x in t)
        return t.double() if isinstance(t, Tensor) and t.is_floating_point() else t

    return {k: cast(v) for k, v in inputs.items()}


# --- torch.func (also the float64 reference) ------------------------------------------------

def hessian_trace_laplacian(X: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """Per-datum Laplacians by nested torch.func: vmap over data of ``trace(hessian(u))``."""
    u = per_datum(params)
    return vmap(lambda x: torch.trace(hessian(u)(x)))(X)


def hessian_trace_biharmonic(X: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """Per-datum biharmonic by nested torch.func: ``trace(hessian(trace(hessian(u))))``."""
    u = per_datum(params)

    def lap(x: Tensor) -> Tensor:
        return torch.trace(hessian(u)(x))

    return vmap(lambda x: torch.trace(hessian(lap)(x)))(X)


def hvp_hutchinson(X: Tensor, V: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """Per-datum ``(1/S) sum_s v_s . (H v_s)``, HVPs by ``jvp(grad(u))``, vmapped over the
    directions and the data; ``V`` (batch, S, D)."""
    u = per_datum(params)

    def vhv(x: Tensor, v: Tensor) -> Tensor:
        return (jvp(grad(u), (x,), (v,))[1] * v).sum()

    return vmap(lambda x, Vb: vmap(vhv, in_dims=(None, 0))(x, Vb).mean())(X, V)


def func_hvp(sizes: tuple[int, ...], theta: Tensor, X: Tensor, Y: Tensor, v: Tensor) -> Tensor:
    """``H v`` of :func:`hvp_loss` w.r.t. theta by ``jvp(grad(loss))``."""
    loss = hvp_loss(sizes)
    return jvp(lambda th: grad(loss)(th, X, Y), (theta,), (v,))[1]


def tracked(params: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Fresh copies of the parameters that require grad (the PINN step differentiates them)."""
    return tuple(p.detach().clone().requires_grad_(True) for p in params)


def pinn_blocks(loss: Tensor, params: tuple[Tensor, ...]) -> Blocks:
    """The PINN step's result: the loss and, by autograd, its gradient w.r.t. each parameter
    (zeros for the last bias, which no Laplacian depends on)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return {(0,): loss.detach().reshape(1), **{(i + 1,): g for i, g in enumerate(grads)}}


def reference(row: TaylorRow, inputs: dict[str, object]) -> dict[str, Blocks]:
    """The row's result by nested torch.func in float64 on the inputs cast to float64, keyed by
    :data:`DIRECTIONS` name on a stochastic row (the estimate with those directions, from the
    full float64 Hessians), by ``""`` on the others."""
    d = to_double(inputs)
    X, params = d["X"], d["params"]
    if row.kind == "laplacian":
        return {"": {(0,): hessian_trace_laplacian(X, params)}}
    if row.kind == "biharmonic":
        return {"": {(0,): hessian_trace_biharmonic(X, params)}}
    if row.kind == "stochastic":
        H = vmap(hessian(per_datum(params)))(X)
        return {name: {(0,): torch.einsum("bsi,bij,bsj->b", d[name], H, d[name]) / row.samples}
                for name in DIRECTIONS}
    if row.kind == "hvp":
        return {"": {(0,): func_hvp(row.sizes, d["theta"], X, d["Y"], d["v"])}}
    if row.kind == "pinn":
        weights = tracked(params)
        return {"": pinn_blocks(pinn_loss(hessian_trace_laplacian(X, weights), d["s"]), weights)}
    raise ValueError(f"unknown taylor row kind {row.kind!r}")


def as_blocks(row: TaylorRow, out: object) -> Blocks:
    """An engine's result as Blocks: a per-datum or HVP tensor is flattened (engines return
    ``(batch,)`` or ``(batch, 1)``); a PINN step's Blocks are passed on."""
    if row.kind == "pinn":
        return out
    return {(0,): out.detach().reshape(-1)}


# --- the matmul floor ------------------------------------------------------------------------

def floor_vectors(row: TaylorRow) -> tuple[int, bool]:
    """How many vectors per datum a forward Taylor method must push through every weight
    matrix, and whether the backward matmuls count too:

    * laplacian: D + 2 (primal, D directions, one collapsed second-order coefficient);
    * biharmonic: 2 + 3 D(D+1)/2 (primal, orders 1-3 along the D(D+1)/2 pairs i <= j, one
      collapsed fourth-order coefficient);
    * stochastic: S + 2;
    * hvp: 3 per datum, with the backward: forward-over-reverse multiplies ``X W``,
      ``X' W + X W'`` forward and as many in each of the two backward products per layer;
    * pinn: D + 2, with the backward (gradient w.r.t. the inputs and the weights).
    """
    D = row.dim
    return {
        "laplacian": (D + 2, False),
        "biharmonic": (2 + 3 * D * (D + 1) // 2, False),
        "stochastic": (row.samples + 2, False),
        "hvp": (3, True),
        "pinn": (D + 2, True),
    }[row.kind]


def matmul_floor(row: TaylorRow, weights: list[Tensor]) -> Callable[[], Tensor]:
    """A thunk doing only the floor's matmuls (:func:`floor_vectors`): ``batch * n`` stacked
    vectors through every weight matrix (biases and activations left out), plus for the
    backward two matmuls per layer (input and weight gradients) of the same sizes."""
    n, backward = floor_vectors(row)
    rows = row.batch * n
    acts = [torch.randn(rows, W.shape[0]) for W in weights]
    outs = [torch.randn(rows, W.shape[1]) for W in weights]

    def thunk() -> Tensor:
        last = None
        for A, G, W in zip(acts, outs, weights, strict=True):
            last = A @ W
            if backward:
                last = G @ W.T
                last = A.T @ G
        assert last is not None
        return last

    return thunk
