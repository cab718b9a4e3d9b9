"""The reference result of a row and the absolute error floor of its check.

Reference: torch.func (``jacrev`` inside ``order - 1`` ``jacfwd``) evaluated in float64 on the
row's inputs cast to float64. The engines run in float32 and are compared with it by
:func:`bench.compare.compare_blocks`: ``max|got - ref| <= RTOL * max|ref| + floor`` with

    floor = max(ATOL, NOISE_FACTOR * noise, ROUNDOFF * activation_scale)

* ``ATOL`` (1e-3): the seed's relu/softmax MLP has identically zero derivatives (softmax rows
  sum to one, so the output is the batch size), so a float32 engine can only be asked for
  round-off-sized values there; up to ~3e-4 is seen on the CPU for the seed's sizes.
* ``noise``: the same error measured for torch.func run in float32 on this row, so the floor
  follows the round-off a standard method produces (e.g. on another device).
* ``activation_scale``: the largest magnitude of any tensor computed by the float32 forward pass.
  With rand weights the deep relu MLPs reach activations of 1e5..1e10 and saturate the softmax;
  torch's softmax backward then yields exact zeros, while a method whose softmax derivative
  leaves round-off of ~1e-13 (thoad, even in float64) sees it amplified by those magnitudes to
  ~1e-3. That is round-off, not a wrong derivative; ``ROUNDOFF`` is float32's machine epsilon.

The tanh MLP rows, whose derivatives are of size 1e-3 to 1e2 with activations below 1, are where
the relative term does the checking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from bench.compare import Blocks, flatten_nested, max_abs_diff
from bench.engines import torch_func_derivative
from bench.models import Case

ATOL = 1e-3
NOISE_FACTOR = 10.0
ROUNDOFF = torch.finfo(torch.float32).eps


@dataclass
class Reference:
    """Reference blocks of a row, with what sets the absolute error floor of its check."""

    blocks: Blocks
    noise: float
    activation_scale: float

    @property
    def floor(self) -> float:
        """The absolute term of the tolerance (module docstring)."""
        return max(ATOL, NOISE_FACTOR * self.noise, ROUNDOFF * self.activation_scale)

    def describe(self) -> str:
        return (
            f"torch.func float64; float32 noise {self.noise:.1e}, "
            f"max|activation| {self.activation_scale:.1e}, abs floor {self.floor:.1e}"
        )


class _MaxAbsMode(TorchFunctionMode):
    """Records the largest finite magnitude among the tensors that torch functions return."""

    def __init__(self) -> None:
        super().__init__()
        self.max_abs = 0.0

    def __torch_function__(
        self,
        func: Callable[..., object],
        types: object,
        args: tuple[object, ...] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor) and out.is_floating_point() and out.numel():
            finite = out.detach()[torch.isfinite(out.detach())]
            if finite.numel():
                self.max_abs = max(self.max_abs, float(finite.abs().max()))
        return out


def activation_scale(case: Case, inputs: tuple[Tensor, ...]) -> float:
    """Largest magnitude of any intermediate of the forward pass on ``inputs``."""
    mode = _MaxAbsMode()
    with torch.no_grad(), mode:
        case.forward(*inputs)
    return mode.max_abs


def reference(case: Case, inputs: tuple[Tensor, ...]) -> Reference:
    """Compute the reference of a row (float64) and its tolerance inputs (float32)."""
    fn = torch_func_derivative(case.forward, case.order, case.argnums)
    blocks = flatten_nested(fn(*(t.double() for t in inputs)), case.order, case.argnums)
    single = flatten_nested(fn(*inputs), case.order, case.argnums)
    return Reference(blocks, max_abs_diff(single, blocks), activation_scale(case, inputs))
