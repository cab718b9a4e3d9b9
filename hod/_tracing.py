"""Trace stage: a flat tensor function becomes a functional ATen graph (``make_fx``).

Tracing runs on fake tensors, so it costs no arithmetic, works with whatever tensors the
caller holds (including ones batched by ``torch.func.vmap``) and turns data-dependent
Python control flow into an error instead of a silently baked-in branch.

:func:`trace_forward` traces ``f`` over a call's flat tensors (:func:`flat_function`), and
:func:`trace_reverse` its reverse-mode Jacobian, the graph reverse-last mode derives.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx
from torch._C._functorch import (
    get_unwrapped,
    is_batchedtensor,
    is_gradtrackingtensor,
    maybe_current_level,
    maybe_get_level,
)
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves

from ._product_sums import gather_product_sums
from ._records import FlatCall, Request, Traced
from .decompositions import DECOMPOSITIONS
from .errors import InputError, OutputError, TracingError, UnsupportedOperatorError

aten = torch.ops.aten

_TORCH_DIR = os.path.dirname(torch.__file__)
_HOD_DIR = os.path.dirname(__file__)


def trace(
    fn: Callable[..., list[torch.Tensor]], examples: Sequence[torch.Tensor], call: str,
    allow_random: bool = False,
) -> fx.GraphModule:
    """``make_fx`` of ``fn`` (functionalized, decomposed) on contiguous fake copies of
    ``examples`` (the generated code is called on contiguous tensors).

    ``call`` names the public call for error messages. Random ops are refused unless
    ``allow_random``. Returns the GraphModule.

    Tracing runs outside any enclosing ``torch.func`` transform (``grad``, ``vmap``): the
    graph describes ``f`` on plain tensors, and the generated code is then run on the
    caller's (possibly wrapped) tensors, so the transforms apply to it as to any function.
    Under ``grad`` the transform's interpreter would otherwise swallow the traced ops.
    """
    enclosing_level = maybe_current_level()
    with temporarily_clear_interpreter_stack():
        fakes = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in examples]
        gm = _make_fx(fn, fakes, call, enclosing_level)
    _reject_input_mutation(gm, call)
    _reject_data_dependence(gm, call, lambda op: find_call_site(fn, examples, op))
    if not allow_random:
        _reject_random(gm, call, lambda: find_call_site(fn, examples, _is_random))
    _functional_views(gm)
    _functional_pointwise(gm)
    _cancel_reshape_round_trips(gm)
    gather_product_sums(gm)
    return gm


def _make_fx(
    fn: Callable, fakes: list[torch.Tensor], call: str, enclosing_level: int | None
) -> fx.GraphModule:
    try:
        # Without oneDNN, CPU modules trace to the ops their float64 path takes, which have
        # rules (float32 LSTMs would reach aten.mkldnn_rnn_layer); the generated code's
        # convolutions and products still pick their kernels when they run.
        with _RejectTransformedCaptures(call, enclosing_level), _without_onednn():
            return make_fx(
                torch.func.functionalize(fn),
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
        missing = re.search(r"derivative for '(\w+)' is not implemented", str(exc))
        if isinstance(exc, NotImplementedError) and missing:
            site = find_call_site(fn, fakes, lambda op: missing[1] in str(op))
            raise UnsupportedOperatorError(
                f"{call}: torch has no derivative formula for the op '{missing[1]}'"
                + (f" (from {site})" if site else "")
                + ", and hod traces torch's formulas for the reverse part of a derivative.\n"
                "  Expected: ops with a hod rule or a torch derivative formula.\n"
                "  Fix: rewrite that line with supported ops, or open an issue asking for a "
                "rule."
            ) from exc
        raise


def _reject_data_dependence(
    gm: fx.GraphModule, call: str, call_site: Callable[[object], str | None]
) -> None:
    """Refuse values that depend on tensor data (``.item()``, ``nonzero``, masks)."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        shape = val.shape if isinstance(val, torch.Tensor) else ()
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)) or not all(
            isinstance(d, int) for d in shape
        ):
            site = call_site(node.target)
            raise TracingError(
                f"{call}: a value or shape depends on the data in a tensor ({node.target}"
                + (f", from {site}" if site else "")
                + ").\n"
                "  Expected: shapes and Python numbers that follow from the input shapes "
                "alone (no .item(), .tolist(), nonzero or boolean-mask indexing).\n"
                "  Fix: keep values as tensors and select with torch.where(cond, a, b) "
                "or a multiplicative mask."
            )


class _RejectTransformedCaptures(TorchFunctionMode):
    """Refuses a captured tensor that belongs to an enclosing ``torch.func`` transform.

    Such a tensor (the ``W`` of ``grad(lambda W: hod.hessian(lambda x: f(x, W))(x))``)
    lives only while that transform runs, so it cannot become a constant of cached code.
    Transforms used while tracing (hod's own ``vjp``, or ``f``'s) wrap fake tensors; an
    enclosing one wraps a real tensor. A captured real tensor that an op inside the trace
    returns as itself (``W.to(W.device)``) is wrapped at one of the trace's own levels, so
    only wrappers at the levels of transforms enclosing the call (``enclosing_level`` and
    below; ``None`` when there are none) count.
    """

    def __init__(self, call: str, enclosing_level: int | None) -> None:
        super().__init__()
        self.call = call
        self.enclosing_level = enclosing_level

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, torch.Tensor) and _from_enclosing_transform(
                leaf, self.enclosing_level
            ):
                raise TracingError(
                    f"{self.call}: the function uses a tensor from its closure that an "
                    f"enclosing torch.func transform (grad, vmap, jacrev, ...) is tracking.\n"
                    f"  Expected: tensors the transform tracks reach the function as "
                    f"arguments.\n"
                    f"  Fix: pass it as an argument, e.g. hod.hessian(f)(x, W) instead of "
                    f"hod.hessian(lambda x: f(x, W))(x)."
                )
        if isinstance(func, type(_DATA_GETTER)) and func == _DATA_GETTER:
            # `.data` dispatches no ATen op, so it would vanish from the graph and be
            # differentiated through; record it as the detach it stands for.
            return args[0].detach()
        return func(*args, **(kwargs or {}))


_DATA_GETTER = torch.Tensor.data.__get__


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    """oneDNN kernels off (``torch.backends.mkldnn.flags`` would also warn about TF32)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _from_enclosing_transform(t: torch.Tensor, enclosing_level: int | None) -> bool:
    if enclosing_level is None:
        return False
    wrapped = False
    while True:
        if is_batchedtensor(t) or is_gradtrackingtensor(t):
            wrapped = wrapped or maybe_get_level(t) <= enclosing_level
            t = get_unwrapped(t)
        elif torch._is_functional_tensor(t):
            t = torch._from_functional_tensor(t)
        else:
            return wrapped and not isinstance(t, FakeTensor)


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
        if node.op == "call_function" and (
            node.target is aten.copy_.default or _is_inplace_view(node.target)
        ):
            if node.args[0] in placeholders:
                index = placeholders.index(node.args[0])
                raise TracingError(
                    f"{call}: the function modifies its input tensor #{index} in place "
                    f"(an in-place op such as `x.mul_(2)` or `x[...] = ...`).\n"
                    f"  Expected: a function that leaves its inputs unchanged.\n"
                    f"  Fix: use the out-of-place form (`x = x * 2`, `torch.where`, "
                    f"`x.clone()` before writing)."
                )


def _is_random(op: object) -> bool:
    return isinstance(op, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in op.tags


def _reject_random(gm: fx.GraphModule, call: str, call_site: Callable[[], str | None]) -> None:
    for node in gm.graph.nodes:
        op = node.target
        if _is_random(op):
            site = call_site()
            raise TracingError(
                f"{call}: the function draws random numbers ({op}"
                + (f", from {site}" if site else "")
                + ").\n"
                "  Expected: a deterministic function (dropout in eval mode, no torch.rand, "
                "bernoulli, ...).\n"
                "  Fix: call model.eval() or pass the noise in as an argument; or opt in "
                "with allow_random=True, and the draw happens inside the generated code, "
                "anew on every call."
            )


def _is_inplace_view(op: object) -> bool:
    return isinstance(op, torch._ops.OpOverload) and torch.Tag.inplace_view in op.tags


def _functional_views(gm: fx.GraphModule) -> None:
    """Replace in-place view ops (``squeeze_``, which ``matmul`` of a vector emits and
    functionalization leaves in place) by their out-of-place overloads.

    ``make_fx`` maps each tensor object to the node that last produced it, so every later
    use of a tensor whose metadata an in-place view changed already reads that node's
    output: renaming the op is enough.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and _is_inplace_view(node.target):
            node.target = _out_of_place(node.target)
    gm.recompile()


def _functional_pointwise(gm: fx.GraphModule) -> None:
    """Replace in-place pointwise ops that write a tensor nothing else reads by their
    out-of-place overloads.

    Decompositions run below functionalization and keep their in-place ops: torch's
    ``gru_cell`` writes ``chunk.add_(x).sigmoid_()`` into chunks of a fresh product. As for
    views (see :func:`_functional_views`), every later use of the written tensor reads the
    in-place node already; the write is unseen only if no other tensor shares its memory:
    a fresh result, or a piece of a fresh result that only its split reads (pieces of one
    split do not overlap). Then the out-of-place op computes the same values, and the
    graph is one that derivative rules (and the adjoint driver) read.
    """
    for node in gm.graph.nodes:
        op = node.target
        if (node.op == "call_function" and isinstance(op, torch._ops.OpOverload)
                and torch.Tag.pointwise in op.tags and op._schema.name.endswith("_")
                and op._schema.arguments[0].is_write and _unshared(node.args[0])):
            node.target = _out_of_place(op)
    gm.recompile()


_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)


def _unshared(node: object) -> bool:
    """Whether ``node``'s tensor shares its memory with no other node's, but for the other
    pieces of a split of a fresh tensor that only the split reads."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:
        split = node.args[0]
        return (isinstance(split, fx.Node) and split.target in _SPLITS
                and _fresh(split.args[0]) and len(split.args[0].users) == 1)
    return _fresh(node)


def _fresh(node: object) -> bool:
    """Whether ``node`` is an op's result in memory of its own (not a view, nor written in
    place into an argument)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    op = node.target
    if not isinstance(op, torch._ops.OpOverload):
        return False
    returns = op._schema.returns
    return len(returns) == 1 and returns[0].alias_info is None


def _out_of_place(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """The overload of ``op``'s out-of-place packet taking the same arguments
    (``transpose_.default`` -> ``transpose.int``)."""
    packet = getattr(aten, op._schema.name.split("::")[1].rstrip("_"))
    names = [a.name for a in op._schema.arguments]
    return next(
        getattr(packet, overload) for overload in packet.overloads()
        if [a.name for a in getattr(packet, overload)._schema.arguments] == names
    )


#: Ops that regroup a tensor's dims and keep its entries in row-major order.
_RESHAPES = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
})


def _cancel_reshape_round_trips(gm: fx.GraphModule) -> None:
    """Read a chain of reshapes that ends in its start's shape as its start.

    Such a chain keeps every entry in place, so it is the identity. ``vmap`` leaves many:
    the product ``x @ W`` of one example's vector becomes ``unsqueeze``, ``view``, ``mm``,
    ``view`` and ``squeeze`` over the batch, and every derivative order would repeat them.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _RESHAPES:
            continue
        shape = node.meta["val"].shape
        source = node.args[0]
        while isinstance(source, fx.Node):
            if source.meta["val"].shape == shape:
                node.replace_all_uses_with(source)
                break
            if source.op != "call_function" or source.target not in _RESHAPES:
                break
            source = source.args[0]
    for node in reversed(gm.graph.nodes):
        if node.op == "call_function" and node.target in _RESHAPES and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


class _FirstCallSite(TorchDispatchMode):
    """Remembers the first user-code line that dispatches an ATen op ``matches`` accepts."""

    def __init__(self, matches: Callable[[torch._ops.OpOverload], bool]) -> None:
        super().__init__()
        self.matches = matches
        self.site: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.site is None and self.matches(func):
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
    op: torch._ops.OpOverload | Callable[[torch._ops.OpOverload], bool],
) -> str | None:
    """Re-run ``fn`` on meta tensors to find the line that calls ``op`` (error path only).

    ``op`` is an ATen op, or a predicate over ATen ops.
    """
    matches = op if not isinstance(op, torch._ops.OpOverload) else (lambda f: f is op)
    metas = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in examples]
    mode = _FirstCallSite(matches)
    try:
        with temporarily_clear_interpreter_stack(), mode:
            fn(*metas)
    except Exception:  # noqa: BLE001 - best effort: the site is a hint in an error message
        pass
    return mode.site


# -- f over the flat tensors of a call, and its two graphs ------------------------------------
def flat_function(request: Request, flat: FlatCall, holder: dict | None = None):
    """``f`` over the flat tensor leaves, returning ``outputs + aux`` leaves; ``holder``,
    when given, receives the structure of what ``f`` returned."""

    def flat_f(*tensors: torch.Tensor) -> list[torch.Tensor]:
        args, kwargs = flat.rebuild(list(tensors))
        result = request.f(*args, **kwargs)
        aux: list[torch.Tensor] = []
        if request.has_aux:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise OutputError(
                    f"{request.call}: has_aux=True, so the function must return a pair "
                    f"(output, aux), but it returned {type(result).__name__}"
                    + (f" of length {len(result)}" if isinstance(result, tuple) else "")
                    + ".\n  Fix: return (output, aux), or drop has_aux=True."
                )
            result, aux_tree = result
            aux, aux_spec = flatten_outputs(aux_tree, "aux output", request.call)
            if holder is not None:
                holder["aux_spec"] = aux_spec
        outs, out_spec = flatten_outputs(result, "output", request.call)
        if holder is not None:
            holder["out_spec"], holder["n_out"], holder["n_aux"] = out_spec, len(outs), len(aux)
        return [*outs, *aux]

    return flat_f


def flatten_outputs(value: Any, what: str, call: str) -> tuple[list[torch.Tensor], TreeSpec]:
    """Flatten the function's output; every leaf must be a tensor."""
    leaves, spec = tree_flatten(value)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise InputError(
                f"{call}: the function's {what} contains a {type(leaf).__name__}.\n"
                f"  Expected: a tensor or a pytree (tuple/list/dict) of tensors.\n"
                f"  Fix: return tensors only (wrap numbers with torch.tensor), or return "
                f"extra values through has_aux=True."
            )
    return leaves, spec


def op_call_site(request: Request, flat: FlatCall) -> Callable[[object], str | None]:
    """``site(op)``: the line of ``f`` that calls ``op`` (see :func:`find_call_site`)."""

    def call_site(op: object) -> str | None:
        return find_call_site(flat_function(request, flat), flat.tensors, op)

    return call_site


def trace_forward(request: Request, flat: FlatCall) -> Traced:
    """``f``'s graph over the flat tensors: ``[*outputs, *aux]``."""
    holder: dict = {}
    gm = trace(
        flat_function(request, flat, holder), flat.tensors, request.call,
        request.allow_random,
    )
    return Traced(gm, holder["out_spec"], holder.get("aux_spec"), holder["n_out"],
                  holder["n_aux"])


def trace_reverse(request: Request, flat: FlatCall, forward: Traced) -> Traced:
    """Trace ``[y, dy/dx_leaf for each differentiated leaf, *aux]`` for one output ``y``."""
    flat_f = flat_function(request, flat)
    n_out = forward.n_out

    def reverse(*tensors: torch.Tensor) -> list[torch.Tensor]:
        def of_diff(*diff: torch.Tensor):
            filled = list(tensors)
            for pos, value in zip(flat.diff, diff, strict=True):
                filled[pos] = value
            outs = flat_f(*filled)
            return outs[0], outs[n_out:]

        diff = [tensors[pos] for pos in flat.diff]
        y, vjp_fn, aux = torch.func.vjp(of_diff, *diff, has_aux=True)
        # Independent examples (flat.rows) each get their own gradients from one sweep.
        m = y.numel() // (flat.rows or 1)
        if m == 1:
            grads = vjp_fn(torch.ones_like(y))
        else:
            eye = torch.eye(m, dtype=y.dtype, device=y.device)
            basis = (eye.view(m, *y.shape) if flat.rows is None
                     else eye.view(m, 1, *y.shape[1:]).expand(m, *y.shape))
            grads = torch.func.vmap(vjp_fn)(basis)
        return [y, *grads, *aux]

    gm = trace(reverse, flat.tensors, request.call, request.allow_random)
    return Traced(gm, forward.out_spec, forward.aux_spec, 1 + len(flat.diff), forward.n_aux)


def check_outputs(out_vals: list[torch.Tensor], call: str) -> None:
    """Refuse outputs that have no derivative (integer or boolean tensors)."""
    for val in out_vals:
        if not val.dtype.is_floating_point:
            raise OutputError(
                f"{call}: the function returns a tensor of dtype {val.dtype}.\n"
                f"  Expected: floating-point outputs (integer outputs have no derivative).\n"
                f"  Fix: return a floating tensor, or move it to the aux output "
                f"(has_aux=True)."
            )
