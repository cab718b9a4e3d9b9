"""Stage 1: trace a flat tensor function to a functional ATen graph with ``make_fx``.

Tracing runs on fake tensors, so it costs no arithmetic, works with whatever tensors the
caller holds (including ones batched by ``torch.func.vmap``) and turns data-dependent
Python control flow into an error instead of a silently baked-in branch.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from .decompositions import DECOMPOSITIONS
from .errors import TracingError

aten = torch.ops.aten

_TORCH_DIR = os.path.dirname(torch.__file__)
_HOD_DIR = os.path.dirname(__file__)


def trace(fn: Callable[..., list[torch.Tensor]], examples: Sequence[torch.Tensor], call: str):
    """``make_fx`` of ``fn`` (functionalized, decomposed) on fake copies of ``examples``.

    ``call`` names the public call for error messages. Returns the GraphModule.
    """
    fakes = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
             for t in examples]
    traced_fn = torch.func.functionalize(fn)
    try:
        gm = make_fx(
            traced_fn,
            decomposition_table=DECOMPOSITIONS,
            tracing_mode="fake",
            _allow_non_fake_inputs=True,
        )(*fakes)
    except TracingError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with context below
        if _is_data_dependent(exc):
            raise TracingError(
                f"{call}: the function branches on the values of a tensor "
                f"({type(exc).__name__}), which a traced derivative cannot follow.\n"
                f"  Expected: control flow that depends only on shapes and Python values.\n"
                f"  Fix: replace `if tensor...` with torch.where(cond, a, b) or torch.cond."
            ) from exc
        raise
    _reject_input_mutation(gm, call)
    return gm


def _is_data_dependent(exc: BaseException) -> bool:
    names = {"GuardOnDataDependentSymNode", "DataDependentOutputException",
             "DynamicOutputShapeException"}
    while exc is not None:
        if type(exc).__name__ in names or "data-dependent" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _reject_input_mutation(gm: fx.GraphModule, call: str) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.copy_.default:
            if node.args[0] in placeholders:
                index = placeholders.index(node.args[0])
                raise TracingError(
                    f"{call}: the function modifies its input tensor #{index} in place "
                    f"(an in-place op such as `x.mul_(2)` or `x[...] = ...`).\n"
                    f"  Expected: a function that leaves its inputs unchanged.\n"
                    f"  Fix: use the out-of-place form (`x = x * 2`, `torch.where`, "
                    f"`x.clone()` before writing)."
                )


class _FirstCallSite(TorchDispatchMode):
    """Remembers the first user-code line that dispatches a given ATen op."""

    def __init__(self, op: torch._ops.OpOverload) -> None:
        super().__init__()
        self.op = op
        self.site: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op and self.site is None:
            self.site = user_frame()
        return func(*args, **(kwargs or {}))


def user_frame() -> str | None:
    """``file:line (code)`` of the innermost frame outside torch and hod, if any."""
    for frame in reversed(traceback.extract_stack()):
        filename = os.path.abspath(frame.filename)
        if filename.startswith((_TORCH_DIR, _HOD_DIR)) or "<frozen" in filename:
            continue
        return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return None


def find_call_site(
    fn: Callable[..., list[torch.Tensor]],
    examples: Sequence[torch.Tensor],
    op: torch._ops.OpOverload,
) -> str | None:
    """Re-run ``fn`` on meta tensors to find the line that calls ``op`` (error path only)."""
    metas = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in examples]
    mode = _FirstCallSite(op)
    try:
        with mode:
            fn(*metas)
    except Exception:  # noqa: BLE001 - best effort: the site is a hint in an error message
        pass
    return mode.site
