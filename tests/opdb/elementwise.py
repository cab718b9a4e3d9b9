"""Op database entries: elementwise ops and activations, tested to order 5.

Every unary op has two entries: ``name`` differentiates the op itself (forward mode: its
output is as large as its input) and ``name.sum`` its sum, which hod differentiates
through torch's gradient graph (reverse-last), so the ops of the op's backward formula
are tested too. Samples stay inside the op's domain and away from kinks; entries of
non-smooth ops add one sample on the kinks to pin torch's convention there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import D, OpInfo, add, rand

aten = torch.ops.aten


def _unary_samples(low: float, high: float, special: tuple[float, ...]):
    """A 2x3 tensor, a transposed (non-contiguous) one, a 0-dim one, and the kinks."""

    def samples() -> list[tuple]:
        out = [
            (rand(2, 3, low=low, high=high),),
            (rand(3, 2, low=low, high=high).t(),),
            (rand(1, low=low, high=high)[0],),
        ]
        if special:
            out.append((torch.tensor(special, dtype=D),))
        return out

    return samples


def unary(
    name: str, fn: Callable, aten_ops: tuple, grad_aten: tuple = (), *, low: float = -1.0,
    high: float = 1.0, kinks: tuple[float, ...] = (), family: str = "elementwise",
    degree: int | None = None,
) -> None:
    """Entries ``name`` (the op, to order 5) and ``name.sum`` (its gradient graph, whose
    order-4 derivatives push order-3 jets through the backward formula)."""
    samples = _unary_samples(low, high, kinks)
    add(
        OpInfo(name, fn, samples, aten=aten_ops, max_order=5, family=family, degree=degree),
        OpInfo(f"{name}.sum", lambda x: fn(x).sum(), samples, aten=grad_aten, max_order=4,
               family=family, degree=degree),
    )


# -- math functions ---------------------------------------------------------------------------
unary("abs", torch.abs, (aten.abs.default,), (aten.sign.default, aten.full_like.default),
      kinks=(0.0, -0.5, 0.5), degree=1)
unary("neg", torch.neg, (aten.neg.default,), degree=1)
unary("exp", torch.exp, (aten.exp.default,))
unary("exp2", torch.exp2, (aten.exp2.default,), (aten.mul.Scalar,))
unary("expm1", torch.expm1, (aten.expm1.default,), (aten.add.Scalar,))
unary("log", torch.log, (aten.log.default,), (aten.div.Tensor,), low=0.5, high=2.0)
unary("log2", torch.log2, (aten.log2.default,), low=0.5, high=2.0)
unary("log10", torch.log10, (aten.log10.default,), low=0.5, high=2.0)
unary("log1p", torch.log1p, (aten.log1p.default,), low=-0.5, high=1.0)
unary("sqrt", torch.sqrt, (aten.sqrt.default,), low=0.5, high=2.0)
unary("rsqrt", torch.rsqrt, (aten.rsqrt.default,), (aten.pow.Tensor_Scalar,), low=0.5, high=2.0)
unary("reciprocal", torch.reciprocal, (aten.reciprocal.default,), low=0.5, high=2.0)
unary("square", torch.square, (aten.pow.Tensor_Scalar,), degree=2)
unary("sin", torch.sin, (aten.sin.default,), (aten.cos.default,))
unary("cos", torch.cos, (aten.cos.default,), (aten.sin.default,))
unary("tan", torch.tan, (aten.tan.default,))
unary("asin", torch.asin, (aten.asin.default,), low=-0.8, high=0.8)
unary("acos", torch.acos, (aten.acos.default,), low=-0.8, high=0.8)
unary("atan", torch.atan, (aten.atan.default,), low=-2.0, high=2.0)
unary("sinh", torch.sinh, (aten.sinh.default,), (aten.cosh.default,))
unary("cosh", torch.cosh, (aten.cosh.default,), (aten.sinh.default,))
unary("tanh", torch.tanh, (aten.tanh.default,), (aten.sub.Tensor,))
unary("asinh", torch.asinh, (aten.asinh.default,), low=-2.0, high=2.0)
unary("acosh", torch.acosh, (aten.acosh.default,), (aten.sub.Scalar,), low=1.2, high=3.0)
unary("atanh", torch.atanh, (aten.atanh.default,), low=-0.8, high=0.8)
unary("sigmoid", torch.sigmoid, (aten.sigmoid.default,))
unary("erf", torch.erf, (aten.erf.default,))
unary("erfc", torch.erfc, (aten.erfc.default,))
unary("pow_scalar_exponent", lambda x: x**2.5, (aten.pow.Tensor_Scalar,), low=0.5, high=2.0)
unary("pow_integer_exponent", lambda x: x**3, (aten.pow.Tensor_Scalar,), low=-2.0, high=2.0,
      degree=3)
unary("pow_scalar_base", lambda x: 1.7**x, (aten.pow.Scalar,), low=-2.0, high=2.0)

# Piecewise-constant factors: their derivative is zero away from the jumps.
unary("sign", lambda x: torch.sign(x) * x**2, (aten.sign.default,), degree=2)
unary("floor", lambda x: torch.floor(3 * x) * x, (aten.floor.default,), degree=1)
unary("ceil", lambda x: torch.ceil(3 * x) * x, (aten.ceil.default,), degree=1)
unary("round", lambda x: torch.round(3 * x) * x, (aten.round.default,), degree=1)
unary("trunc", lambda x: torch.trunc(3 * x) * x, (aten.trunc.default,), degree=1)
unary("frac", lambda x: torch.frac(3 * x), (aten.trunc.default,), degree=1)
unary("floor_divide", lambda x: torch.div(x, 0.3, rounding_mode="floor") * x,
      (aten.div.Tensor_mode,), degree=1)
unary("detach_alias_clone", lambda x: x.detach() * x[...] + x.clone(),
      (aten.detach.default, aten.alias.default, aten.clone.default), degree=1)
# copy_ into a fresh tensor: traced as its functional form, copy (label smoothing's
# decomposition keeps copy_ itself, see cross_entropy_sum_smoothing).
unary("copy_into_fresh", lambda x: torch.empty_like(x).copy_(torch.sin(x)),
      (aten.copy.default,))
unary("where_comparison",
      lambda x: torch.where((x > 0.2) | (x < -0.5) | (x == 0.0), torch.sin(x), x * x),
      (aten.where.self,), kinks=(0.2, -0.5, 0.0))

# -- activations ----------------------------------------------------------------------------
def activation(name: str, fn: Callable, aten_ops: tuple, grad_aten: tuple = (), **kw) -> None:
    unary(name, fn, aten_ops, grad_aten, family="activation", **kw)


activation("relu", lambda x: F.relu(x), (aten.relu.default,), (aten.threshold_backward.default,),
           kinks=(0.0, 0.5), degree=1)
activation("leaky_relu", lambda x: F.leaky_relu(x, 0.2), (aten.leaky_relu.default,),
           kinks=(0.0, -0.5), degree=1)
activation("elu", lambda x: F.elu(x), (aten.elu.default,), kinks=(0.0, -0.5, 0.5))
activation("elu_scaled", lambda x: F.elu(x, 0.5), (aten.elu.default,), kinks=(0.0,))
activation("selu", lambda x: F.selu(x), (aten.elu.default,), kinks=(0.0,))
activation("celu", lambda x: F.celu(x, 0.7), (aten.elu.default,), kinks=(0.0,))
activation("gelu", lambda x: F.gelu(x), (aten.gelu.default,), (aten.erf.default,),
           low=-2.0, high=2.0)
activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), (aten.gelu.default,),
           low=-2.0, high=2.0)
activation("silu", lambda x: F.silu(x), (aten.sigmoid.default,), low=-2.0, high=2.0)
activation("mish", lambda x: F.mish(x), (aten.log1p.default, aten.tanh.default),
           low=-2.0, high=2.0)
activation("softplus", lambda x: F.softplus(x), (aten.log1p.default, aten.where.self),
           low=-3.0, high=3.0)
activation("softplus_threshold", lambda x: F.softplus(x, beta=2.0, threshold=3.0),
           (aten.log1p.default,), low=-3.0, high=3.0, kinks=(2.0, -0.5))
activation("logsigmoid", lambda x: F.logsigmoid(x), (aten.minimum.default, aten.abs.default),
           low=-3.0, high=3.0)
activation("hardtanh", lambda x: F.hardtanh(x, -0.5, 0.5), (aten.hardtanh.default,),
           kinks=(-0.5, 0.5, 0.0, 0.8), degree=1)
activation("clamp", lambda x: torch.clamp(x, -0.5, 0.5), (aten.clamp.default,),
           kinks=(-0.5, 0.5, 0.0, -0.8), degree=1)
activation("clamp_min", lambda x: torch.clamp_min(x, -0.3), (aten.clamp.default,),
           kinks=(-0.3, 0.0), degree=1)
activation("clamp_max", lambda x: torch.clamp_max(x, 0.3), (aten.clamp.default,),
           kinks=(0.3, 0.0), degree=1)


# -- binary ops -------------------------------------------------------------------------------
def binary(name: str, fn: Callable, aten_ops: tuple, samples: Callable, **kw) -> None:
    """An op of two tensors, both differentiated."""
    add(OpInfo(name, fn, samples, aten=aten_ops, argnums=(0, 1), max_order=5,
               family="binary", **kw))


def _pairs(low=(-1.0, -1.0), high=(1.0, 1.0)):
    """Broadcasting pairs: ``(2, 3)`` with ``(3,)``, a transposed ``(2, 3)`` with ``(2, 1)``."""

    def samples() -> list[tuple]:
        return [
            (rand(2, 3, low=low[0], high=high[0]), rand(3, low=low[1], high=high[1])),
            (rand(3, 2, low=low[0], high=high[0]).t(), rand(2, 1, low=low[1], high=high[1])),
        ]

    return samples


def _ties(a: list[float], b: list[float]):
    return lambda: [*_pairs()(), (torch.tensor(a, dtype=D), torch.tensor(b, dtype=D))]


binary("add", lambda a, b: torch.add(a, b, alpha=2.0), (aten.add.Tensor,), _pairs(), degree=1)
binary("sub", lambda a, b: torch.sub(a, b, alpha=0.5), (aten.sub.Tensor,), _pairs(), degree=1)
binary("mul", torch.mul, (aten.mul.Tensor,), _pairs(), degree=2)
binary("div", torch.div, (aten.div.Tensor,), _pairs(low=(-1.0, 0.5), high=(1.0, 2.0)))
binary("div_rounding_mode_none", lambda a, b: torch.div(a, b, rounding_mode=None),
       (aten.div.Tensor_mode,), _pairs(low=(-1.0, 0.5), high=(1.0, 2.0)))
binary("div_rounding_mode_trunc", lambda a, b: torch.div(a, b, rounding_mode="trunc") * a + b,
       (aten.div.Tensor_mode,), _pairs(low=(-1.0, 0.5), high=(1.0, 2.0)), degree=1)
binary("pow", torch.pow, (aten.pow.Tensor_Tensor,), _pairs(low=(0.5, -2.0), high=(2.0, 2.0)))
binary("maximum", torch.maximum, (aten.maximum.default,),
       _ties([0.5, 0.2, -0.3], [0.5, 0.4, -0.3]), degree=1)
binary("minimum", torch.minimum, (aten.minimum.default,),
       _ties([0.5, 0.2, -0.3], [0.5, 0.4, -0.3]), degree=1)
binary("atan2", torch.atan2, (aten.atan2.default,), _pairs(low=(-1.0, -1.0)))
binary("hypot", torch.hypot, (aten.hypot.default,), _pairs(low=(0.2, 0.2)))
binary("xlogy", torch.xlogy, (aten.log.default,), _pairs(low=(-1.0, 0.5), high=(1.0, 2.0)))
binary("where", lambda a, b: torch.where(a > b, a * b, b), (aten.where.self,), _pairs(), degree=2)
add(
    OpInfo(
        "pow_tensor_exponent_constant",
        lambda x: x ** torch.tensor([2.0, 3.0, -1.0], dtype=D),
        lambda: [(rand(2, 3, low=0.5, high=2.0),), (rand(2, 3, low=-2.0, high=-0.5),)],
        aten=(aten.pow.Tensor_Tensor,), max_order=5, family="binary",
    ),
    OpInfo(
        "clamp_tensor_bounds", torch.clamp,
        lambda: [(rand(2, 3), rand(3, low=-0.6, high=-0.2), rand(2, 1, low=0.2, high=0.6)),
                 tuple(torch.tensor(v, dtype=D) for v in ([-0.5, 0.5, 0], [-0.5] * 3, [0.5] * 3))],
        aten=(aten.where.self,), argnums=(0, 1, 2), max_order=5, family="binary", degree=1
    ),
    OpInfo(
        "div_by_scalar", lambda x: x / 3.0 - 2.0 * x, lambda: [(rand(2, 3),)],
        aten=(aten.div.Tensor,), max_order=5, family="binary", degree=1
    ),
    OpInfo(
        "atan2_near_axis", torch.atan2,
        lambda: [(torch.tensor([1.0, -1.0, 1e-9, 0.7], dtype=D),
                  torch.tensor([1e-12, 0.0, -2.0, -0.7], dtype=D))],
        aten=(aten.atan2.default,), argnums=(0, 1), max_order=5, family="binary",
    ),
)
