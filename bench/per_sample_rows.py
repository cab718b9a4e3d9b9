"""The rows of the ``per-sample`` sweep: models of one example, their inputs and references.

A :class:`PerSampleRow` fixes a model ``f_single`` of one example ``x`` of shape ``(D,)``
(:func:`single`; the weights are captured, not arguments), a batch ``X`` of shape
``(batch, D)`` and the order of the derivative w.r.t. ``x`` (1: Jacobians, 2: Hessians, 3).
The per-sample result, ``vmap(<derivative>(f_single))(X)``, has shape
``(batch,) + out + (D,) * order``. Models:

* ``tanh``: :func:`bench.taylor_rows.mlp` on layer ``sizes`` (biases, tanh after every layer
  but the last), its output ``(out,)``, or a scalar when ``out == 1``; inputs drawn as the
  taylor rows' (Glorot-uniform weights, ``X`` uniform in [-1, 1]);
* ``seed``: the seed notebook's relu/softmax layers (:func:`bench.models.relu_softmax_layers`,
  ``depth`` square weights of the ``width``), read out as ``(layers(x) * r).sum()`` with one
  fixed non-uniform vector ``r`` shared by every example (the seed sweeps' read-out weights
  differ per row of the batch, which would make ``f_single`` depend on the example's index);
  inputs as the seed sweeps' (:func:`bench.models.make_inputs`).

The summed batched function (:func:`summed`) ``X -> vmap(f_single)(X).sum(0)`` holds the same
derivatives: its order-``k`` derivative w.r.t. ``X`` is block diagonal over the examples
(:func:`block_diagonal`). The sum is over the batch only, so a vector output keeps its vector.
This module needs torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import Tensor
from torch.func import vmap

from bench.engines import torch_func_derivative
from bench.models import Case, readout_weights, relu_softmax_layers
from bench.models import make_inputs as seed_inputs
from bench.taylor_rows import TaylorRow, mlp, to_double
from bench.taylor_rows import make_inputs as taylor_inputs

#: What each order is called in labels and tables.
DERIVATIVE_NAMES = {1: "Jacobians", 2: "Hessians", 3: "order 3"}
#: ``--quick`` caps every layer width and the batch at these.
QUICK_WIDTH, QUICK_BATCH = 32, 4


@dataclass(frozen=True)
class PerSampleRow:
    """One row: ``model`` (``tanh`` or ``seed``), its layer ``sizes`` (``sizes[0]`` = D; a
    seed row's are ``(width,) * (depth + 1)``), the batch and the derivative's order."""

    model: str
    sizes: tuple[int, ...]
    batch: int
    order: int

    @property
    def dim(self) -> int:
        return self.sizes[0]

    @property
    def argnums(self) -> int:
        """The derivative is w.r.t. the example, the transformed function's only argument."""
        return 0

    @property
    def out_shape(self) -> tuple[int, ...]:
        """``f_single``'s output shape: scalar for the seed model and a one-unit tanh MLP."""
        return () if self.model == "seed" or self.sizes[-1] == 1 else (self.sizes[-1],)

    def label(self) -> str:
        """E.g. ``Hessians, tanh 20-256-256-1, b64`` or ``Hessians, seed w10 d3, b80``."""
        if self.model == "seed":
            model = f"seed w{self.dim} d{len(self.sizes) - 1}"
        else:
            model = f"tanh {'-'.join(map(str, self.sizes))}"
        return f"{DERIVATIVE_NAMES[self.order]}, {model}, b{self.batch}"

    def quick(self) -> PerSampleRow:
        """The row at ``--quick`` sizes: widths and batch capped (:data:`QUICK_WIDTH`, ...)."""
        sizes = tuple(min(w, QUICK_WIDTH) for w in self.sizes)
        return PerSampleRow(self.model, sizes, min(self.batch, QUICK_BATCH), self.order)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _seed_row(width: int, depth: int, batch: int) -> PerSampleRow:
    return PerSampleRow("seed", (width,) * (depth + 1), batch, 2)


#: The issue's rows (#17), then per-sample Hessians of the seed MLP at sizes of its Hessian
#: sweeps w.r.t. X (hess_x_batch's smallest and largest batch, hess_x_width's widest row,
#: hess_x_depth's deepest); the seed's Hessians w.r.t. the weights have no per-sample form.
PER_SAMPLE_ROWS: tuple[PerSampleRow, ...] = (
    PerSampleRow("tanh", (10, 10, 10, 10), 80, 2),
    PerSampleRow("tanh", (20, 256, 256, 1), 64, 2),
    PerSampleRow("tanh", (50, 768, 768, 512, 512, 1), 16, 2),
    PerSampleRow("tanh", (10, 10, 10, 10), 80, 1),
    PerSampleRow("tanh", (6, 16, 16, 1), 32, 3),
    _seed_row(10, 3, 10),
    _seed_row(10, 3, 80),
    _seed_row(80, 3, 10),
    _seed_row(20, 10, 10),
)


def make_inputs(row: PerSampleRow, seed: int) -> dict[str, object]:
    """``X`` (batch, D) and ``params`` (a tuple of float32 weights), reproducible from ``seed``."""
    if row.model == "seed":
        case = Case("relu_softmax", row.order, False, row.batch, row.dim, len(row.sizes) - 1)
        X, *params = seed_inputs(case, seed)
        return {"X": X, "params": tuple(params)}
    inputs = taylor_inputs(TaylorRow("per-sample", row.sizes, row.batch), seed)
    return {"X": inputs["X"], "params": inputs["params"]}


def single(row: PerSampleRow, params: tuple[Tensor, ...]) -> Callable[[Tensor], Tensor]:
    """``f_single``: ``x (D,) -> out`` with ``params`` captured (module docstring)."""
    if row.model == "seed":
        r = readout_weights(1, row.dim)[0].to(params[0].dtype)

        def seed_mlp(x: Tensor) -> Tensor:
            return (relu_softmax_layers(x.unsqueeze(0), *params)[0] * r).sum()

        return seed_mlp

    def tanh_mlp(x: Tensor) -> Tensor:
        return mlp(x.unsqueeze(0), *params).reshape(row.out_shape)

    return tanh_mlp


def summed(f_single: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The summed batched function ``X (batch, D) -> vmap(f_single)(X).sum(0)`` (shape out)."""

    def batch_sum(X: Tensor) -> Tensor:
        return vmap(f_single)(X).sum(0)

    return batch_sum


def torch_func_per_sample(f_single: Callable[[Tensor], Tensor], order: int) -> Callable:
    """``vmap`` of torch.func's order-``order`` derivative of ``f_single`` (jacrev,
    torch.func.hessian, jacrev inside two jacfwd: :func:`bench.engines.torch_func_derivative`)."""
    return vmap(torch_func_derivative(f_single, order, 0))


def reference(row: PerSampleRow, inputs: dict[str, object]) -> Tensor:
    """The per-sample derivatives ``(batch,) + out + (D,) * order`` by torch.func in float64
    on the inputs cast to float64."""
    d = to_double(inputs)
    return torch_func_per_sample(single(row, d["params"]), row.order)(d["X"])


def block_diagonal(per_sample: Tensor, order: int) -> Tensor:
    """The derivative of :func:`summed` from the per-sample ones: ``out + (batch, D) * order``,
    example ``b``'s derivative where every ``batch`` index is ``b``, zeros elsewhere."""
    batch, dim = per_sample.shape[0], per_sample.shape[-1]
    out = per_sample.shape[1:per_sample.dim() - order]
    full = per_sample.new_zeros(*out, *(batch, dim) * order)
    for b in range(batch):
        full[(..., *(b, slice(None)) * order)] = per_sample[b]
    return full
