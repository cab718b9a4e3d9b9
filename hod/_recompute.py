"""Autograd through generated code by recomputation.

When autograd alone watches a call (some input, or a tensor ``f`` captures such as a
module's parameters, requires grad; no ``torch.func`` transform, no compile), running the
generated code under autograd records every one of its calls, and the planned variant,
which writes into reused memory, cannot run. :class:`Recomputed` runs the planned code
without recording instead and saves only its inputs; a backward pass runs the plain
generated code again under autograd and differentiates that (the trade that activation
checkpointing makes). A call whose result is never differentiated skips the recording
altogether; a backward pass pays one more run of the code. ``create_graph=True`` gives
gradients that are differentiable again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .passes.memory import ordinary


def recomputable(tensors: Sequence[torch.Tensor], captured: Sequence[torch.Tensor]) -> bool:
    """Whether autograd, and nothing else, watches a call on ``tensors`` of code that reads
    ``captured``: grad mode on, some tensor requiring grad, every tensor a plain one and no
    ``torch.func`` transform or compile active."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or \
            torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    every = [*tensors, *captured]
    return all(ordinary(t) for t in every) \
        and any(t.requires_grad for t in every)


class Recomputed(torch.autograd.Function):
    """``run(tensors)`` without recording, differentiated by running ``plain`` again.

    ``apply(run, plain, count, *tensors, *watched)``: ``tensors`` (``count`` of them) are
    the code's inputs, ``watched`` the captured tensors that require grad, which ``plain``
    (the generated module's ``forward``) reads itself.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable, plain: Callable, count: int,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plain, ctx.count = plain, count
        ctx.save_for_backward(*tensors)
        inputs = tensors[:count]
        # an output that is an input as it came must not be the same tensor
        return tuple(out.clone() if any(out is t for t in inputs) else out
                     for out in run(inputs))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        create = torch.is_grad_enabled()  # backward(create_graph=True)
        saved = ctx.saved_tensors  # the inputs, then the watched captured tensors
        inputs = saved[: ctx.count]
        wanted = ctx.needs_input_grad[3:]
        targets = [t for t, need in zip(saved, wanted, strict=True) if need]
        with torch.enable_grad():
            outs = ctx.plain(*inputs)
            pairs = [(o, g) for o, g in zip(outs, grads, strict=True)
                     if g is not None and o.requires_grad]
            found = iter(torch.autograd.grad(
                [o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True,
                create_graph=create,
            ) if pairs and targets else [None] * len(targets))
        return (None, None, None, *(next(found) if need else None for need in wanted))
