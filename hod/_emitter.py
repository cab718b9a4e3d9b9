"""Builds the generated fx.Graph: one node per ATen call, with shapes known at trace time.

The emitter is where trace-time simplification lives: it removes duplicate expressions
(common-subexpression elimination keyed by op and arguments), folds multiplications by
0/1 and additions of symbolic zeros (``None``), and records a ``meta``-device tensor for
every node so rules can ask for shapes and dtypes without running anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .errors import MemoryLimitError

aten = torch.ops.aten

#: On the CPU (where ATen's loops were measured), products at least this large spread an
#: operand broadcast along their last dim (see :meth:`Emitter._widened`), to at most this
#: many entries.
WIDEN_MIN_ENTRIES = 32768
#: ... or this large when their last dim is at most :data:`SHORTEST_ROW` long.
WIDEN_MIN_SHORT_ENTRIES = 4096
SHORTEST_ROW = 4
WIDEN_MAX_ENTRIES = 65536
#: A sum over a last dim this short runs as a product with ones (:meth:`Emitter.sum_dims`).
SHORT_ROW = 16

Operand = fx.Node | float | int | bool | None


def _freeze(value: Any) -> Any:
    """A hashable key for an argument (nodes hash by identity)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_freeze(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, torch.dtype | torch.device | torch.layout | torch.memory_format):
        return ("torch", str(value))
    if isinstance(value, float) and value != value:  # NaN never equals itself
        return ("nan",)
    return (type(value).__name__, value) if not isinstance(value, fx.Node) else value


def _to_meta(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return value.meta["val"]
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A ``meta`` tensor with ``t``'s shape, strides and dtype."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def graph_call(graph: fx.Graph, op: object, *args: object) -> fx.Node:
    """``op(*args)`` added to a graph built elsewhere (where it inserts), with its meta
    value: for the passes that rewrite a finished graph."""
    node = graph.call_function(op, args)
    node.meta["val"] = op(*fx.map_arg(args, lambda a: meta_like(a.meta["val"])))
    return node


def graph_module(graph: fx.Graph, constants: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A GraphModule running ``graph``, holding ``constants`` as attributes."""
    root = torch.nn.Module()
    for name, value in constants.items():
        setattr(root, name, value)
    return fx.GraphModule(root, graph)


class Emitter:
    """Appends ATen calls to a new graph; see the module docstring.

    ``device`` is the device of the traced inputs: factory calls (``zeros``, ``eye``) are
    emitted on it, while shapes are computed on the ``meta`` device. ``compiling`` says
    the code is meant for torch.compile, which fuses what ATen runs op by op: rules may
    pick other forms for it.
    """

    def __init__(
        self, device: torch.device, dtype: torch.dtype, memory_limit: int | None = None,
        call: str = "hod", compiling: bool = False,
    ) -> None:
        self.compiling = compiling
        self.graph = fx.Graph()
        self.memory_limit = memory_limit
        self.call_name = call
        self.device = device
        self.dtype = dtype
        self.constants: dict[str, torch.Tensor] = {}
        self._seen: dict[Any, fx.Node] = {}

    # -- nodes -----------------------------------------------------------------------------
    def placeholder(self, name: str, example: torch.Tensor) -> fx.Node:
        node = self.graph.placeholder(name)
        node.meta["val"] = meta_like(example)
        return node

    def constant(self, name: str, value: torch.Tensor) -> fx.Node:
        """A tensor stored on the generated module (closure-captured tensors)."""
        key = ("constant", id(value))
        if key not in self._seen:
            attr = f"_const_{len(self.constants)}_{name}"
            self.constants[attr] = value
            node = self.graph.get_attr(attr)
            node.meta["val"] = meta_like(value)
            self._seen[key] = node
        return self._seen[key]

    def call(self, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """Emit ``op(*args, **kwargs)`` once; a repeated call returns the first node."""
        key = (op, _freeze(args), _freeze(kwargs))
        node = self._seen.get(key)
        if node is None and op in _COMMUTATIVE and len(args) == 2 and not kwargs:
            node = self._seen.get((op, _freeze(args[::-1]), _freeze(kwargs)))
        if node is None:
            meta_args = _to_meta(args)
            meta_kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
            val = op(*meta_args, **meta_kwargs)
            simpler = _simplify(op, args, val)
            if simpler is not None:
                self._seen[key] = simpler
                return simpler
            self._check_size(op, val)
            node = self.graph.call_function(op, tuple(args), dict(kwargs))
            node.meta["val"] = val
            constant = _constant_value(op, args)
            if constant is not None:
                node.meta[_SCALAR] = constant
            strides = _delta_of_permute(op, args) or _delta_of_view(op, args)
            if strides is not None:
                node.meta[_DELTA] = strides
            self._seen[key] = node
        return node

    def _check_size(self, op: Any, val: Any) -> None:
        """Refuse, at trace time, a tensor the generated code would allocate past the limit."""
        if self.memory_limit is None or not isinstance(val, torch.Tensor) or val._is_view():
            return
        size = val.numel() * val.element_size()
        if size > self.memory_limit:
            raise MemoryLimitError(
                f"{self.call_name}: the generated code would allocate a tensor of shape "
                f"{tuple(val.shape)} ({_human(size)}, from {op}), over the memory "
                f"limit of {_human(self.memory_limit)}. Nothing was computed.\n"
                f"  Fix: differentiate fewer inputs or a lower order, use smaller inputs, "
                f"or raise the limit with memory_limit=<bytes> (None disables it).",
                nbytes=size, limit=self.memory_limit,
            )

    def output(self, values: Sequence[fx.Node]) -> None:
        self.graph.output(list(values))

    # -- facts about nodes -----------------------------------------------------------------
    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["val"].shape)

    @staticmethod
    def rank(node: fx.Node) -> int:
        return node.meta["val"].dim()

    @staticmethod
    def dtype_of(node: fx.Node) -> torch.dtype:
        return node.meta["val"].dtype

    # -- folding helpers -------------------------------------------------------------------
    def mul(self, a: Operand, b: Operand) -> Operand:
        """``a * b`` where ``None`` and ``0`` are zeros and ``1`` is the identity."""
        if a is None or b is None or _is_zero(a) or _is_zero(b):
            return None
        if _is_one(a):
            return b
        if _is_one(b):
            return a
        if not isinstance(a, fx.Node):
            a, b = b, a
        if not isinstance(a, fx.Node):
            return a * b
        if not isinstance(b, fx.Node):
            base, factor = _scaled(a)
            if factor != 1:  # (x * c) * b as x * (c * b)
                return self.mul(base, factor * b)
        else:
            shape = torch.broadcast_shapes(self.shape(a), self.shape(b))
            a, b = self._widened(a, shape, b), self._widened(b, shape, a)
        return self.call(aten.mul.Tensor, a, b)

    def sum_dims(self, t: fx.Node, dims: Sequence[int], keepdim: bool) -> fx.Node:
        """``t.sum(dims, keepdim)``; a large sum over a short last dim is a product with
        ones instead: ATen's reduction runs one inner loop per row there (0.56 ms for
        ``(186624, 4)`` against 0.17 ms for ``mv``)."""
        shape = list(self.shape(t))
        dims = [d % len(shape) for d in dims]
        n = shape[-1] if shape else 0
        if (
            self.device.type != "cpu"
            or dims != [len(shape) - 1] or n > SHORT_ROW or math.prod(shape) < WIDEN_MIN_ENTRIES
            or self.dtype_of(t) not in (torch.float32, torch.float64)
            or not self._is_view_compatible(t, [-1, n])
        ):
            return self.call(aten.sum.dim_IntList, t, dims, keepdim)
        ones = self.call(aten.ones.default, [n], dtype=self.dtype_of(t), device=self.device)
        rows = self.call(aten.mv.default, self.reshape(t, [math.prod(shape) // n, n]), ones)
        return self.reshape(rows, shape[:-1] + [1] * keepdim)

    def _widened(self, node: fx.Node, shape: Sequence[int], other: fx.Node) -> fx.Node:
        """``node``, when it broadcasts along the last dim of a large product of
        ``shape``, materialized over its trailing broadcast dims.

        ATen's elementwise loops run one inner loop per stretch of the last dim; a
        broadcast last dim of 4 cuts them to 4 entries, which measured 17x slower than
        the same product with the small operand spread out (1.16 ms against 0.066 ms
        for ``(46656, 4, 4) * (4, 1)``). A small operand is spread over as many trailing
        dims as a size bound allows; a large one, times a small ``other``, over its last
        dim only: a copy is fast where the product is not (0.27 + 0.07 ms against
        1.26 ms for ``(4, 4) * (46656, 4, 1)``).
        """
        total = math.prod(shape)
        own = [1] * (len(shape) - self.rank(node)) + list(self.shape(node))
        if self.device.type != "cpu" or not shape:
            return node
        if own[-1] != 1 or shape[-1] == 1:
            return self._widened_inner_run(node, shape, own)
        if total < (WIDEN_MIN_SHORT_ENTRIES if shape[-1] <= SHORTEST_ROW else WIDEN_MIN_ENTRIES):
            return node
        wide = self._spread_dims(shape, own)
        if wide == own and 8 * math.prod(self.shape(other)) <= total:
            wide[-1] = shape[-1]
        return self._spread(node, own, wide)

    def _widened_inner_run(
        self, node: fx.Node, shape: Sequence[int], own: list[int]
    ) -> fx.Node:
        """``node`` spread over trailing broadcast dims when it is not broadcast along the
        last dims of the product but just before them, leaving a short run of entries
        that the loops can take together: ``(4, 1) * (36, 36, 36, 4, 1)`` runs 4 entries
        at a time, 73 us, and 0.01 + 0.02 ms with the ``(4, 1)`` spread to
        ``(36, 36, 4, 1)``."""
        run = 1
        for d in range(len(shape) - 1, -1, -1):
            if own[d] != shape[d]:
                break
            run *= shape[d]
        else:
            return node  # not broadcast
        if run == 1 or run > SHORTEST_ROW or math.prod(shape) < WIDEN_MIN_ENTRIES:
            return node
        return self._spread(node, own, self._spread_dims(shape, own))

    @staticmethod
    def _spread_dims(shape: Sequence[int], own: list[int]) -> list[int]:
        """``own`` with its broadcast dims filled from the last, while the spread operand
        stays small (``WIDEN_MAX_ENTRIES``, an eighth of the product)."""
        wide = list(own)
        for d in range(len(shape) - 1, -1, -1):
            if wide[d] == 1 and shape[d] > 1:
                if math.prod(wide) * shape[d] > min(WIDEN_MAX_ENTRIES, math.prod(shape) // 8):
                    break
                wide[d] = shape[d]
        return wide

    def _spread(self, node: fx.Node, own: list[int], wide: list[int]) -> fx.Node:
        if wide == own:
            return node
        spread = self.expand(self.reshape(node, own), wide)
        return self.call(aten.clone.default, spread, memory_format=torch.contiguous_format)

    def add(self, a: Operand, b: Operand) -> Operand:
        """``a + b`` where ``None`` is a symbolic zero."""
        if a is None or _is_zero(a):
            return b
        if b is None or _is_zero(b):
            return a
        if not isinstance(a, fx.Node):
            a, b = b, a
        if not isinstance(a, fx.Node):
            return a + b
        if isinstance(b, fx.Node):
            (x, ca), (y, cb) = _scaled(a), _scaled(b)
            if x is y and ca + cb != 0:  # x * ca + x * cb as x * (ca + cb)
                return self.mul(x, ca + cb)
        for first, second in ((a, b), (b, a)):
            negated = _negated(second)
            if negated is not None:  # a + (-x) as a - x: one op, the same bits
                return self.call(aten.sub.Tensor, first, negated)
        return self.call(aten.add.Tensor, a, b)

    def sub(self, a: Operand, b: Operand) -> Operand:
        return self.add(a, self.neg(b))

    def neg(self, a: Operand) -> Operand:
        if a is None:
            return None
        if not isinstance(a, fx.Node):
            return -a
        return self.call(aten.neg.default, a)

    def sum_terms(self, terms: Sequence[Operand]) -> Operand:
        """The sum of ``terms``; terms that scale one node are added as one scaled term."""
        groups: dict[Any, list[Operand]] = {}
        for term in terms:
            key = _scaled(term)[0] if isinstance(term, fx.Node) else ("not a node", len(groups))
            groups.setdefault(key, []).append(term)
        total: Operand = None
        for group in groups.values():
            part: Operand = None
            for term in group:
                part = self.add(part, term)
            total = self.add(total, part)
        return total

    def product(self, factors: Sequence[Operand]) -> Operand:
        result: Operand = 1
        for factor in factors:
            result = self.mul(result, factor)
        return result

    def reshape(self, node: fx.Node, shape: Sequence[int]) -> fx.Node:
        shape = [int(s) for s in shape]
        if list(self.shape(node)) == shape:
            return node
        if node.target is aten.expand.default:
            # Keep the expand outermost, where products see it (a seed compressed over a
            # batch of examples is expanded over them, then viewed by the traced code).
            base = node.args[0]
            base_shape = _expanded_view(self.shape(base), self.shape(node), shape)
            if base_shape is not None:
                return self.expand(self.reshape(base, base_shape), shape)
        if self._is_view_compatible(node, shape):
            return self.call(aten.view.default, node, shape)
        return self.call(aten.reshape.default, node, shape)

    def expand(self, node: fx.Node, shape: Sequence[int]) -> fx.Node:
        shape = [int(s) for s in shape]
        if list(self.shape(node)) == shape:
            return node
        return self.call(aten.expand.default, node, shape)

    def permute(self, node: fx.Node, dims: Sequence[int]) -> fx.Node:
        dims = [int(d) for d in dims]
        if dims == list(range(len(dims))):
            return node
        return self.call(aten.permute.default, node, dims)

    def eye(self, n: int, like: fx.Node) -> fx.Node:
        """The ``n x n`` identity with ``like``'s dtype."""
        return self.call(aten.eye.default, n, dtype=self.dtype_of(like), device=self.device)

    def seed_identity(self, size: int, shape: Sequence[int], like: fx.Node) -> fx.Node:
        """The identity seed of a ``shape`` leaf, ``(size,) + shape`` with ``size = numel``:
        seed ``s`` is one at the coordinate whose row-major index is ``s``.

        The node records its structure (see :func:`delta_strides`) so that products with
        it can be emitted as placements instead of dense products.
        """
        node = self.reshape(self.eye(size, like), [size, *shape])
        node.meta[_DELTA] = row_major(shape)
        return node

    def zeros(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> fx.Node:
        return self.call(
            aten.zeros.default,
            [int(s) for s in shape],
            dtype=dtype or self.dtype,
            device=self.device,
        )

    def full_scalar(self, value: float, like: fx.Node) -> fx.Node:
        """A 0-dim tensor holding ``value`` with ``like``'s dtype."""
        return self.call(
            aten.scalar_tensor.default, value, dtype=self.dtype_of(like), device=self.device
        )

    def _is_view_compatible(self, node: fx.Node, shape: list[int]) -> bool:
        try:
            node.meta["val"].view(shape)
        except RuntimeError:
            return False
        return True


_COMMUTATIVE = (aten.mul.Tensor, aten.add.Tensor)
_SCALAR = "hod_scalar"  # meta key: every element of the node equals this number
#: Meta key: a compiler should compute the node once into memory rather than inline it
#: into its readers (see :mod:`hod._compiled`).
REALIZE = "hod_realize"
# meta key: the node is an identity seed, ``t[s, *i] = (s == sum_d i_d * c_d)`` with these
# coefficients ``c`` (one per value dim); a permutation of the value dims permutes them.
# The seed axis ``s`` may stand among leading axes of size 1 (a seed axis placed for
# broadcasting); the value dims are the last ``len(c)``.
_DELTA = "hod_delta"


def delta_strides(node: Operand) -> tuple[int, ...] | None:
    """The coefficients ``c`` of an identity-seed node (see ``_DELTA``), else None."""
    return node.meta.get(_DELTA) if isinstance(node, fx.Node) else None


def _delta_of_permute(op: Any, args: tuple) -> tuple[int, ...] | None:
    """An identity seed's coefficients after a permutation that keeps the leading axes
    first (and so the value dims last)."""
    if op is not aten.permute.default or not isinstance(args[0], fx.Node):
        return None
    strides, dims = args[0].meta.get(_DELTA), args[1]
    if strides is None:
        return None
    lead = len(dims) - len(strides)
    if sorted(dims[:lead]) != list(range(lead)):
        return None
    return tuple(strides[d - lead] for d in dims[lead:])


def _delta_of_view(op: Any, args: tuple) -> tuple[int, ...] | None:
    """An identity seed's coefficients after a view that adds or drops leading axes of size
    1, or (when the seeds number the value's entries row-major) one that also reshapes the
    value dims: the seeds then number the new value's entries row-major."""
    if op not in (aten.view.default, aten.reshape.default) or not isinstance(args[0], fx.Node):
        return None
    strides = args[0].meta.get(_DELTA)
    if strides is None:
        return None
    old, new, value = list(Emitter.shape(args[0])), list(args[1]), len(strides)
    if -1 in new:
        known = math.prod(d for d in new if d != -1)
        new[new.index(-1)] = math.prod(old) // known if known else 0
    lead_old = [d for d in old[: len(old) - value] if d != 1]
    if len(new) >= value and new[len(new) - value:] == old[len(old) - value:]:
        return strides if [d for d in new[: len(new) - value] if d != 1] == lead_old else None
    old_value = old[len(old) - value:]
    if strides != row_major(old_value):
        return None
    for cut in range(len(new), -1, -1):  # the shortest value suffix holding every entry
        if math.prod(new[cut:]) == math.prod(old_value):
            lead_new = [d for d in new[:cut] if d != 1]
            return row_major(new[cut:]) if lead_new == lead_old and cut < len(new) else None
    return None


def row_major(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


_FILLS = {aten.full_like.default: 1, aten.full.default: 1, aten.scalar_tensor.default: 0}
_SAME_VALUES = {
    aten.expand.default, aten.view.default, aten.clone.default, aten.alias.default,
    aten._to_copy.default, aten.reshape.default, aten.permute.default,
}


def _constant_value(op: Any, args: tuple) -> float | None:
    """The single value every element of ``op(*args)`` holds, when known at trace time."""
    if op in _FILLS:
        value = args[_FILLS[op]]
        return value if isinstance(value, (int, float)) else None
    if op in _SAME_VALUES and isinstance(args[0], fx.Node):
        return args[0].meta.get(_SCALAR)
    return None


def _simplify(op: Any, args: tuple, val: Any) -> fx.Node | None:
    """An existing node equal to ``op(*args)``: multiplying by ones, adding zeros."""
    if op not in (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor) or len(args) != 2:
        return None
    identity = 1 if op is aten.mul.Tensor else 0
    a, b = args
    candidates = [(b, a)] if op is aten.sub.Tensor else [(a, b), (b, a)]
    for const, other in candidates:
        if (
            isinstance(const, fx.Node) and const.meta.get(_SCALAR) == identity
            and isinstance(other, fx.Node)
            and other.meta["val"].shape == val.shape and other.meta["val"].dtype == val.dtype
        ):
            return other
    return None


def _scaled(node: fx.Node) -> tuple[fx.Node, float]:
    """``(x, c)`` when ``node`` is ``x * c`` or ``-x`` (``c = -1``) for a number ``c``,
    else ``(node, 1)``."""
    if node.op == "call_function" and node.target is aten.neg.default:
        return node.args[0], -1
    if node.op == "call_function" and node.target is aten.mul.Tensor:
        x, factor = node.args
        if isinstance(x, fx.Node) and type(factor) in (int, float):
            return x, factor
    return node, 1


def _negated(value: Operand) -> fx.Node | None:
    """``x`` when ``value`` is the node ``-x`` (``neg(x)`` or ``x * -1``), else None."""
    if not isinstance(value, fx.Node):
        return None
    x, factor = _scaled(value)
    return x if factor == -1 else None


def _is_zero(value: Operand) -> bool:
    return not isinstance(value, fx.Node) and value is not None and value == 0


def _is_one(value: Operand) -> bool:
    return not isinstance(value, fx.Node) and value is not None and value == 1


def _human(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} bytes"


def _expanded_view(
    base: Sequence[int], expanded: Sequence[int], shape: Sequence[int]
) -> list[int] | None:
    """The shape ``b`` with ``expand(base, expanded).reshape(shape)`` equal to
    ``base.reshape(b).expand(shape)``, or None when the reshape merges an expanded dim
    with one that is not (or ``base`` has fewer dims than ``expanded``).

    The dims of ``expanded`` and ``shape`` are matched in groups of equal product; a group
    of expanded dims becomes ones, any other group keeps its sizes.
    """
    if len(base) != len(expanded):
        return None
    result: list[int] = []
    i = j = 0
    while i < len(expanded) or j < len(shape):
        if i == len(expanded) or j == len(shape):  # only ones may remain, on either side
            if any(d != 1 for d in [*expanded[i:], *shape[j:]]):
                return None
            return result + [1] * (len(shape) - j)
        old, new = [i], [j]
        i, j = i + 1, j + 1
        while math.prod(expanded[k] for k in old) != math.prod(shape[k] for k in new):
            if math.prod(expanded[k] for k in old) < math.prod(shape[k] for k in new):
                if i == len(expanded):
                    return None
                old.append(i)
                i += 1
            else:
                if j == len(shape):
                    return None
                new.append(j)
                j += 1
        grown = [expanded[k] != base[k] for k in old]
        kept = [expanded[k] == base[k] != 1 for k in old]
        if any(grown) and any(kept):
            return None
        result += [1 if any(grown) else shape[k] for k in new]
    return result
