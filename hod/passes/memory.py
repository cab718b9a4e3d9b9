"""Reused memory for the large tensors of generated code (CPU).

Fresh memory is expensive on the CPU: glibc hands large freed blocks back to the OS, and
the next call pays a page fault per 4 KiB page when it first writes them (measured here at
about 0.4 ms per MiB, as much as the arithmetic of a wide Hessian's products). The
generated code is a straight line whose shapes are known at trace time, so :func:`plan`
knows every large tensor's size and lifetime before anything runs, and rewrites the ops
that make them into their ``out=`` forms:

* intermediates that never escape are laid out in one **arena**, reused by every call;
* tensors the results are views of get one **slot** each: a memory map that the next call
  writes again once the caller has dropped every result viewing it (its reference count
  says so), and a fresh one while the caller still holds them.

Transparent huge pages are not requested: they made fresh memory 6x cheaper to fault in
here, but a call whose results were still held (so its slots needed fresh memory) then
took 3.6x longer (414 ms against 115 ms), stalled in the kernel.

The planned code runs only on plain CPU tensors outside autograd, vmap and compilation
(:func:`unwatched`), one call at a time per generated function; other calls run the ordinary
code.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from .._emitter import Emitter
from .concat import add_padded_in_place, allocates, concatenate_in_place, into_form

aten = torch.ops.aten

#: Tensors smaller than this (bytes) are left to the allocator, which keeps small blocks.
MIN_PLANNED_BYTES = 256 * 2**10
_ALIGN = 64

#: Ops whose ``out=`` form is a native kernel (some ops' generated ``out=`` forms compute
#: into a temporary and copy it, which would cost more than they save).
_NATIVE_OUT = {
    aten.mul, aten.add, aten.sub, aten.div, aten.neg, aten.exp, aten.log, aten.tanh,
    aten.sigmoid, aten.sin, aten.cos, aten.reciprocal, aten.pow, aten.sqrt, aten.rsqrt,
    aten.mm, aten.mv, aten.bmm, aten.matmul, aten.sum, aten.amax, aten._softmax, aten._log_softmax,
    aten.threshold_backward, aten.addcmul, aten.where, aten.gt, aten.lt, aten.ge, aten.le, aten.cat,
}


def out_form(node: fx.Node) -> tuple[Callable, str] | None:
    """The op computing ``node`` into a given tensor, and the name of that argument."""
    into = into_form(node)
    if into is not None:
        return into, "out"
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op.overloadpacket not in _NATIVE_OUT:
        return None
    packet = op.overloadpacket
    wanted = [(a.name, str(a.type)) for a in op._schema.arguments]
    for name in packet.overloads():
        candidate = getattr(packet, name)
        schema = candidate._schema
        outs = [a for a in schema.arguments if a.is_out]
        rest = [(a.name, str(a.type)) for a in schema.arguments if not a.is_out]
        if len(outs) == 1 and rest == wanted and len(schema.returns) == 1:
            return candidate, outs[0].name
    return None


def ordinary(t: torch.Tensor) -> bool:
    """Whether ``t``'s ops are plain ATen calls: a tensor, or a module's ``Parameter``."""
    return type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)


def unwatched(tensors: Sequence[object]) -> bool:
    """Whether every tensor is an ordinary tensor (a module's ``Parameter`` is one) that no
    transform watches (autograd, vmap/grad, an enclosing torch.compile)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and (
            not ordinary(t)
            or (t.requires_grad and torch.is_grad_enabled())
            or torch._C._functorch.is_functorch_wrapped_tensor(t)
        ):
            return False
    return True


def _mapped(nbytes: int) -> mmap.mmap:
    """Private anonymous memory (a shared mapping would be shared memory, slower to fault
    in: 64 M floats written fresh took 170 ms shared, 95 ms private)."""
    if sys.platform == "win32":
        return mmap.mmap(-1, max(nbytes, 1))
    return mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _view(block: mmap.mmap, offset: int, shape: Sequence[int], dtype: torch.dtype):
    numel = math.prod(shape)
    return torch.frombuffer(block, dtype=dtype, count=numel, offset=offset).view(shape)


@dataclass
class _Slot:
    """The memory of one tensor that results view."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    block: mmap.mmap | None = None

    def tensor(self) -> torch.Tensor:
        # Two references when free: ``self.block`` and getrefcount's argument; every
        # tensor storage made from the block holds one more.
        if self.block is None or sys.getrefcount(self.block) > 2:
            self.block = _mapped(math.prod(self.shape) * self.dtype.itemsize)
        return _view(self.block, 0, self.shape, self.dtype)


@dataclass
class Memory:
    """The arena and the slots of one planned function, made on first use."""

    arena_size: int
    arena_layout: list[tuple[int, tuple[int, ...], torch.dtype]]  # offset, shape, dtype
    slots: list[_Slot]
    lock: threading.Lock = field(default_factory=threading.Lock)
    _arena: list[torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The buffers the planned code writes into: arena views, then slot tensors."""
        with torch.inference_mode(False):  # usable inside and outside inference mode
            if self._arena is None:
                block = _mapped(self.arena_size)
                self._arena = [_view(block, *entry) for entry in self.arena_layout]
            return self._arena + [slot.tensor() for slot in self.slots]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def _placeholders_first(graph: fx.Graph) -> None:
    """Move the calls made between placeholders (a seed identity emitted before the next
    leaf's placeholder) after the last one, where the memory placeholders will follow."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    anchor = placeholders[-1]
    early = []
    for node in graph.nodes:
        if node is anchor:
            break
        if node.op != "placeholder":
            early.append(node)
    for node in early:
        anchor.append(node)
        anchor = node


def plan(graph: fx.Graph) -> tuple[fx.Graph, Memory] | None:
    """A copy of ``graph`` that writes its large tensors into reused memory (taken as
    extra trailing inputs), and that memory; None when nothing is worth planning."""
    copy = copy_graph(graph)
    concatenate_in_place(copy, out_form)
    add_padded_in_place(copy)
    _placeholders_first(copy)
    nodes = list(copy.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    end, escaped = _lifetimes(nodes, index)
    writers = {
        n: None if n.target is aten.empty.memory_format else out_form(n)
        for n in nodes
        if n in end and _bytes(n) >= MIN_PLANNED_BYTES
    }
    large = [n for n, w in writers.items() if w is not None or n.target is aten.empty.memory_format]
    if not large:
        return None
    inner = [n for n in large if n not in escaped]
    results = [n for n in large if n in escaped]
    offsets, size = _assign(inner, index, end)
    anchor = [n for n in nodes if n.op == "placeholder"][-1]
    for i, node in enumerate(inner + results):
        with copy.inserting_after(anchor):
            anchor = buffer = copy.placeholder(f"buffer{i}")
        if writers[node] is None:  # an empty buffer: the planned memory itself
            node.replace_all_uses_with(buffer)
            copy.erase_node(node)
        else:
            op, out_name = writers[node]
            node.target = op
            node.kwargs = {**node.kwargs, out_name: buffer}
    layout = [(offsets[n], Emitter.shape(n), Emitter.dtype_of(n)) for n in inner]
    slots = [_Slot(Emitter.shape(n), Emitter.dtype_of(n)) for n in results]
    return copy, Memory(size, layout, slots)


def _lifetimes(
    nodes: Sequence[fx.Node], index: dict[fx.Node, int]
) -> tuple[dict[fx.Node, int], set[fx.Node]]:
    """For every node that allocates, the index of the last node reading it or a view of
    it; and the set of those that results view."""
    roots: dict[fx.Node, set[fx.Node]] = {}
    end: dict[fx.Node, int] = {}
    escaped: set[fx.Node] = set()
    for node in nodes:
        for arg in node.all_input_nodes:
            for root in roots.get(arg, ()):
                end[root] = max(end[root], index[node])
        if node.op == "output":
            escaped = set().union(*(roots.get(a, set()) for a in node.all_input_nodes))
        elif node.op != "call_function":
            roots[node] = set()  # inputs and constants belong to the caller
        elif allocates(node):
            roots[node] = {node}
            end[node] = index[node]
        else:  # may alias its inputs
            roots[node] = set().union(*(roots.get(a, set()) for a in node.all_input_nodes))
    return end, escaped


def _assign(
    chosen: list[fx.Node], index: dict[fx.Node, int], end: dict[fx.Node, int]
) -> tuple[dict[fx.Node, int], int]:
    """Offsets such that tensors alive at the same time never overlap (largest first)."""
    placed: list[tuple[int, int, int, int]] = []  # (first, last, offset, nbytes)
    offsets: dict[fx.Node, int] = {}
    for node in sorted(chosen, key=_bytes, reverse=True):
        first, last, nbytes = index[node], end[node], -(-_bytes(node) // _ALIGN) * _ALIGN
        busy = sorted((o, o + b) for f, e, o, b in placed if f <= last and first <= e)
        offset = 0
        for lo, hi in busy:
            if offset + nbytes <= lo:
                break
            offset = max(offset, hi)
        placed.append((first, last, offset, nbytes))
        offsets[node] = offset
    return offsets, max((o + b for _, _, o, b in placed), default=0)


def _bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return math.prod(val.shape) * val.dtype.itemsize if isinstance(val, torch.Tensor) else 0
