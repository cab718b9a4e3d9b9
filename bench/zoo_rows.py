"""The rows of the ``zoo`` sweep: models beyond the benchmark MLP (issue #18), each a function of
one float32 tensor whose derivative is asked for.

A :class:`ZooRow` names a model and its sizes; :func:`make_problem` builds it into a
:class:`Problem`: ``f`` (one tensor -> a scalar, every weight and every datum captured) and the
argument ``x``. Parameter rows differentiate the module's parameters as ONE flat vector: ``f``
splits it into the module's shapes and calls the module with ``torch.func.functional_call``, so
that every engine differentiates one 1-D argument. Models (``sizes`` per model):

* ``cnn`` (batch, image side, channels, classes): conv2d 3x3 -> relu -> flatten -> linear,
  cross-entropy over the batch; w.r.t. the parameters;
* ``bn_conv`` (image side, channels, classes): conv2d 3x3 -> BatchNorm2d (eval mode, running
  statistics drawn away from 0 and 1) -> relu -> max-pool 2x2 -> flatten -> linear,
  cross-entropy of one image; w.r.t. the image ``(1, 1, side, side)``;
* ``lstm`` / ``gru`` (sequence length, features, hidden): ``nn.LSTM`` / ``nn.GRU``
  (batch_first, one sequence) and a linear head on the last hidden state, squared error against
  a target; w.r.t. the input sequence ``(1, length, features)`` or the parameters;
* ``transformer`` (sequence length, model width, heads, feed-forward width): one
  ``nn.TransformerEncoderLayer`` (eval mode, dropout 0, batch_first), mean squared error
  against a target; w.r.t. its input ``(1, length, width)``;
* ``mha`` (sequence length, width, heads): ``nn.MultiheadAttention`` self-attention (batch_first),
  mean squared error against a target; w.r.t. its parameters;
* ``logreg`` (samples, features): logistic regression's loss (binary cross-entropy with
  logits, mean) w.r.t. the weights ``(features,)``: the Newton Hessian;
* ``softmax`` (samples, features, classes): softmax regression's cross-entropy w.r.t. the
  weights ``(features, classes)`` flattened;
* ``rosenbrock`` (n,): the chained Rosenbrock function
  ``sum_i 100 (x_{i+1} - x_i^2)^2 + (x_i - 1)^2`` at ``x`` (written ``x_i - 1`` rather than
  ``1 - x_i``, the same square: thoad has no rule for ``rsub``);
* ``pinn`` (points, width): a PINN's network ``u(x, t)``, a tanh MLP 2 -> width -> width -> 1;
  the third derivative tensor of ``u`` w.r.t. its input ``(2,)``, per point of a batch
  ``(points, 2)`` (:attr:`Problem.per_point`: the engines map over the points).

On the attention rows (:data:`ATTENTION`) ``f`` runs under
``sdpa_kernel(SDPBackend.MATH)``: in float32 torch's CPU attention otherwise dispatches to a
fused kernel that neither forward mode nor a second backward can differentiate, so neither
torch.func nor torch.autograd could compute the Hessian (nor the float64 reference be trusted
to take the path the engines take).

Everything is drawn in float32 from the row's seed, then cast to the asked dtype, so the float64
reference sees the very values the engines get. This module needs torch only (the thoad worker
builds the rows in its own interpreter).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

#: What each model is called in labels.
TITLES = {
    "cnn": "small CNN", "bn_conv": "conv + BatchNorm + max-pool", "lstm": "LSTM", "gru": "GRU",
    "transformer": "TransformerEncoderLayer", "mha": "MultiheadAttention",
    "logreg": "logistic regression", "softmax": "softmax regression",
    "rosenbrock": "chained Rosenbrock", "pinn": "PINN tanh MLP",
}
#: The rows whose function runs its attention in the MATH backend (:func:`math_attention`),
#: for every engine and the reference alike.
ATTENTION = ("transformer", "mha")
#: How each model's sizes read in labels.
SIZES = {
    "cnn": "b{0} {1}x{1} c{2} k{3}", "bn_conv": "{0}x{0} c{1} k{2}", "lstm": "T{0} in{1} h{2}",
    "gru": "T{0} in{1} h{2}", "transformer": "T{0} d{1} heads{2} ff{3}",
    "mha": "T{0} d{1} heads{2}", "logreg": "{0}x{1}", "softmax": "{0}x{1} k{2}",
    "rosenbrock": "n={0}", "pinn": "2-{1}-{1}-1, {0} points",
}
#: The argument each model is differentiated with respect to, by its ``wrt`` (``{}``: its
#: number of entries).
ARGUMENTS = {"params": "parameters ({})", "input": "input ({})", "weights": "weights ({})",
             "x": "x ({})", "point": "order 3 w.r.t. (x, t) ({}) per point"}


@dataclass(frozen=True)
class ZooRow:
    """One row: ``model`` (a key of :data:`TITLES`), ``wrt`` (a key of :data:`ARGUMENTS`),
    the model's ``sizes`` (module docstring) and the smaller ``quick_sizes`` of ``--quick``."""

    model: str
    wrt: str
    sizes: tuple[int, ...]
    quick_sizes: tuple[int, ...]

    @property
    def order(self) -> int:
        return 3 if self.model == "pinn" else 2

    @property
    def argnums(self) -> int:
        """The derivative is w.r.t. ``f``'s only argument."""
        return 0

    def label(self) -> str:
        """E.g. ``small CNN b8 8x8 c4 k10, parameters (1490)``: the model, its sizes
        (:data:`SIZES`), the argument and its number of entries."""
        sizes = SIZES[self.model].format(*self.sizes)
        return f"{TITLES[self.model]} {sizes}, {ARGUMENTS[self.wrt].format(argument_size(self))}"

    def quick(self) -> ZooRow:
        """The row at its ``--quick`` sizes."""
        return ZooRow(self.model, self.wrt, self.quick_sizes, self.quick_sizes)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ZooRow:
        return cls(str(d["model"]), str(d["wrt"]), tuple(d["sizes"]),  # type: ignore[arg-type]
                   tuple(d["quick_sizes"]))  # type: ignore[arg-type]


#: The issue's rows (#18), at sizes where hod's call takes about 1-100 ms on one core.
ZOO_ROWS: tuple[ZooRow, ...] = (
    ZooRow("cnn", "params", (8, 8, 4, 10), (4, 6, 2, 3)),
    ZooRow("bn_conv", "input", (16, 4, 10), (8, 2, 3)),
    ZooRow("lstm", "input", (10, 4, 16), (4, 3, 4)),
    ZooRow("lstm", "params", (10, 4, 16), (4, 3, 4)),
    ZooRow("gru", "input", (10, 4, 16), (4, 3, 4)),
    ZooRow("gru", "params", (10, 4, 16), (4, 3, 4)),
    ZooRow("transformer", "input", (8, 16, 2, 32), (3, 8, 2, 8)),
    ZooRow("mha", "params", (6, 16, 2), (3, 4, 2)),
    ZooRow("logreg", "weights", (500, 100), (50, 10)),
    ZooRow("softmax", "weights", (500, 20, 10), (50, 5, 3)),
    ZooRow("rosenbrock", "x", (200,), (20,)),
    ZooRow("rosenbrock", "x", (1000,), (30,)),
    ZooRow("pinn", "point", (1024, 32), (8, 8)),
)


@dataclass
class Problem:
    """A row built: ``f`` of ``x`` (a scalar), and the seed it was drawn from. With
    ``per_point`` (the PINN row) ``x`` is a batch of points ``(points, 2)``, ``f`` maps
    ``(..., 2) -> (...)``, and the derivative asked for is that of ``f`` at each point (under
    ``vmap``, or by any other route to the same ``(points, 2, 2, 2)`` tensor)."""

    f: Callable[[Tensor], Tensor]
    x: Tensor
    per_point: bool = False
    seed: int = 0


def flat_parameter_function(
    module: nn.Module, loss: Callable[[Tensor], Tensor]
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``(f, theta)``: ``theta`` is ``module``'s parameters flattened into one vector, and
    ``f(theta) = loss(outputs)`` where ``outputs`` is what ``loss`` gets from calling ``module``
    with ``theta``'s pieces as its parameters (:func:`torch.func.functional_call`); ``loss``
    receives a function of the parameters dict that calls the module."""
    names = [name for name, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def f(theta: Tensor) -> Tensor:
        pieces = theta.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return loss(lambda *args: functional_call(module, params, args))

    return f, theta


Cast = Callable  # tensor or module -> the same in the problem's dtype
Built = tuple[Callable[[Tensor], Tensor], Tensor]


def _cnn(sizes: tuple[int, ...], c: Cast) -> Built:
    batch, side, channels, classes = sizes
    net = c(nn.Sequential(nn.Conv2d(1, channels, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(channels * (side - 2) ** 2, classes)))
    images = c(torch.randn(batch, 1, side, side))
    labels = torch.randint(0, classes, (batch,))
    return flat_parameter_function(
        net, lambda call: nn.functional.cross_entropy(call(images), labels))


def _bn_conv(sizes: tuple[int, ...], c: Cast) -> Built:
    side, channels, classes = sizes
    norm = nn.BatchNorm2d(channels)
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    net = c(nn.Sequential(nn.Conv2d(1, channels, 3), norm, nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(channels * ((side - 2) // 2) ** 2, classes)))
    net.eval()
    label = torch.randint(0, classes, (1,))
    return (lambda image: nn.functional.cross_entropy(net(image), label),
            c(torch.randn(1, 1, side, side)))


class RecurrentNet(nn.Module):
    """An ``nn.LSTM`` or ``nn.GRU`` (batch_first) and a linear head on its last hidden state:
    ``(batch, length, features) -> (batch, 1)``."""

    def __init__(self, kind: str, features: int, hidden: int) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, sequence: Tensor) -> Tensor:
        return self.head(self.rnn(sequence)[0][:, -1])


def _recurrent(row: ZooRow, c: Cast) -> Built:
    length, features, hidden = row.sizes
    net = c(RecurrentNet(row.model, features, hidden))
    sequence = c(torch.randn(1, length, features))
    target = c(torch.randn(1, 1))
    if row.wrt == "input":
        return lambda seq: (net(seq) - target).square().sum(), sequence
    return flat_parameter_function(net, lambda call: (call(sequence) - target).square().sum())


def _transformer(sizes: tuple[int, ...], c: Cast) -> Built:
    length, width, heads, feedforward = sizes
    layer = c(nn.TransformerEncoderLayer(width, heads, feedforward, dropout=0.0,
                                         batch_first=True)).eval()
    target = c(torch.randn(1, length, width))
    return (lambda x: (layer(x) - target).square().mean(), c(torch.randn(1, length, width)))


def _mha(sizes: tuple[int, ...], c: Cast) -> Built:
    length, width, heads = sizes
    attention = c(nn.MultiheadAttention(width, heads, batch_first=True))
    x = c(torch.randn(1, length, width))
    target = c(torch.randn(1, length, width))
    return flat_parameter_function(
        attention, lambda call: (call(x, x, x)[0] - target).square().mean())


def _logreg(sizes: tuple[int, ...], c: Cast) -> Built:
    samples, features = sizes
    data = c(torch.randn(samples, features))
    labels = c((torch.rand(samples) < 0.5).float())
    return (lambda w: nn.functional.binary_cross_entropy_with_logits(data @ w, labels),
            c(0.1 * torch.randn(features)))


def _softmax(sizes: tuple[int, ...], c: Cast) -> Built:
    samples, features, classes = sizes
    data = c(torch.randn(samples, features))
    labels = torch.randint(0, classes, (samples,))
    return (lambda w: nn.functional.cross_entropy(data @ w.view(features, classes), labels),
            c(0.1 * torch.randn(features * classes)))


def rosenbrock(x: Tensor) -> Tensor:
    """The chained Rosenbrock function of a vector ``x`` (module docstring)."""
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (x[:-1] - 1) ** 2).sum()


def _pinn(sizes: tuple[int, ...], c: Cast) -> Built:
    points, width = sizes
    net = c(nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 1)))

    def u(xt: Tensor) -> Tensor:  # (..., 2) -> (...)
        return net(xt).squeeze(-1)

    return u, c(2 * torch.rand(points, 2) - 1)


def _build(row: ZooRow, c: Cast) -> Built:
    if row.model in ("lstm", "gru"):
        return _recurrent(row, c)
    if row.model == "rosenbrock":
        return rosenbrock, c(0.5 * torch.randn(row.sizes[0]))
    builders = {"cnn": _cnn, "bn_conv": _bn_conv, "transformer": _transformer, "mha": _mha,
                "logreg": _logreg, "softmax": _softmax, "pinn": _pinn}
    return builders[row.model](row.sizes, c)


def make_problem(row: ZooRow, seed: int, dtype: torch.dtype = torch.float32) -> Problem:
    """The row's :class:`Problem` drawn in float32 from ``seed`` (torch's global generator is
    left as it was), its weights, data and argument cast to ``dtype`` (integer labels kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        f, x = _build(row, lambda t: t.to(dtype))
    if row.model in ATTENTION:
        f = math_attention(f)
    return Problem(f, x, per_point=row.model == "pinn", seed=seed)


def math_attention(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``f`` with its attention run by torch's MATH backend of ``scaled_dot_product_attention``
    (the fused CPU kernel has no forward-mode derivative nor a double backward)."""

    def in_math_backend(x: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return f(x)

    return in_math_backend


@functools.cache
def argument_size(row: ZooRow) -> int:
    """The number of entries of the row's argument (per point on the PINN row)."""
    x = make_problem(row, 0).x
    return x.shape[-1] if row.model == "pinn" else x.numel()
