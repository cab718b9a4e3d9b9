"""``chunk_size=`` and ``group=`` on the Taylor transforms (issue 20).

A chunked operator runs its directions ``c`` at a time through one generated code (the
last chunk padded with zero directions) and sums; it must equal the uncut operator, be
generated once per signature whatever the number of chunks, and its code's tensors must
be sized by the chunk. Under a gloo group of two CPU processes every rank takes a slice
of the directions: the ``Partial`` DTensors it returns sum to the single-process result.
"""

from __future__ import annotations

import pytest
import torch
from _distributed import run_ranks
from torch.utils._pytree import tree_flatten, tree_map

import hod
import hod._taylor_api
from hod.errors import InputError, MemoryLimitError

D = torch.float64
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10),
             torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _mlp(x: torch.Tensor) -> torch.Tensor:
    """A network applied row by row to a batch ``(B, 7)``: hod compresses the batch."""
    w = torch.linspace(-1, 1, 35, dtype=x.dtype).reshape(7, 5)
    return torch.tanh(x @ w).sin().pow(2).sum(-1)


def _mixed(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Two arguments coupled: a scalar of ``y (4,)`` and ``z (2, 2)``."""
    return (y.sin() * y[0]).sum() * z.cos().sum() + (y ** 3).prod() + (z @ z).exp().sum()


def _tree(p: dict) -> tuple:
    """A dict argument and two outputs."""
    a, b = p["a"], p["b"]
    return (a.sin() * b.sum()).sum(), torch.stack([a.pow(3).sum(), (a @ b).tanh().sum()])


def _weights(size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.linspace(-1, 1, size * size, dtype=dtype).reshape(size, size).sin()


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(3)


#: Per variant: the transform given the cutting keywords, its arguments (float64), and
#: its number R of directions (so that chunk sizes 1, 3 and 1000 cover one, a
#: non-divisor and more than all).
VARIANTS = {
    "laplacian-batch": (lambda **k: hod.laplacian(_mlp, **k), lambda: (torch.randn(3, 7),),
                        7),
    "laplacian-two-args": (lambda **k: hod.laplacian(_mixed, (0, 1), **k),
                           lambda: (torch.randn(4), torch.randn(2, 2)), 8),
    "laplacian-pytree": (lambda **k: hod.laplacian(_tree, **k),
                         lambda: ({"a": torch.randn(2), "b": torch.randn(2, 3)},), 8),
    "laplacian-samples": (lambda **k: hod.laplacian(_mlp, samples=10, generator=_generator(),
                                                    **k), lambda: (torch.randn(3, 7),), 10),
    "laplacian-weights": (lambda **k: hod.laplacian(_mixed, weights=_weights(4, D), **k),
                          lambda: (torch.randn(4), torch.randn(2, 2)), 8),
    "biharmonic": (lambda **k: hod.biharmonic(_mixed, **k),
                   lambda: (torch.randn(4), torch.randn(2, 2)), 16),
    "biharmonic-samples": (lambda **k: hod.biharmonic(_mixed, samples=5,
                                                      generator=_generator(), **k),
                           lambda: (torch.randn(4), torch.randn(2, 2)), 5),
    "operator": (lambda **k: hod.operator(_mixed, {(0, 0, 1): 1.0, (1,): -2.0, (2, 3): 0.5,
                                                   (0, 0, 0, 3): 0.25}, **k),
                 lambda: (torch.randn(4), torch.randn(2, 2)), None),
}


def _cast(args: tuple, dtype: torch.dtype) -> tuple:
    return tree_map(lambda a: a.to(dtype), args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunks_equal_the_whole(name: str, dtype: torch.dtype) -> None:
    transform, make_args, count = VARIANTS[name]
    args = _cast(make_args(), dtype)
    if name == "laplacian-weights":  # the weights must be like the arguments
        transform = lambda **k: hod.laplacian(_mixed, weights=_weights(4, dtype), **k)  # noqa: E731
    whole = transform()(*args)
    for chunk_size in (1, 3, 1000):
        assert count is None or count % 3, "3 must not divide R"
        torch.testing.assert_close(transform(chunk_size=chunk_size)(*args), whole,
                                   **TOLERANCE[dtype])


def test_value_and_grad_chunked() -> None:
    x = torch.randn(3, 7, dtype=D)
    u, grad, lap = hod.laplacian(_mlp, value_and_grad=True)(x)
    cut = hod.laplacian(_mlp, value_and_grad=True, chunk_size=3)(x)
    for got, want in zip(cut, (u, grad, lap), strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[D])


@pytest.mark.parametrize("name", ["laplacian-batch", "laplacian-samples", "laplacian-weights",
                                  "biharmonic"])
def test_chunks_under_vmap(name: str) -> None:
    """Over 3 examples: the chunk's rows (or its directions and weights) stay unbatched."""
    transform, make_args, _ = VARIANTS[name]
    examples = [torch.stack([a] * 3) + torch.arange(3.0).reshape(3, *[1] * a.dim()) / 10
                for a in _cast(make_args(), D)]
    whole = torch.func.vmap(transform(), randomness="same")(*examples)
    cut = torch.func.vmap(transform(chunk_size=3), randomness="same")(*examples)
    torch.testing.assert_close(cut, whole, **TOLERANCE[D])


def test_operator_with_one_direction() -> None:
    """R = 1: every chunk size is at least R."""
    y = torch.randn(4, dtype=D)
    whole = hod.operator(lambda y: y.exp().prod(), {(0, 0): 1.0})(y)
    torch.testing.assert_close(hod.operator(lambda y: y.exp().prod(), {(0, 0): 1.0},
                                            chunk_size=2)(y), whole)


def _counting_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one on every Taylor code generation."""
    builds: list[int] = []
    build = hod._taylor_api.build_taylor

    def counted(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(hod._taylor_api, "build_taylor", counted)
    return builds


@pytest.mark.parametrize("name", ["laplacian-two-args", "laplacian-samples",
                                  "laplacian-weights", "biharmonic", "operator"])
def test_one_code_for_every_chunk(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three chunks (the last one short) run one generated code, built on the first call."""
    transform, make_args, count = VARIANTS[name]
    args = make_args()
    builds = _counting_builds(monkeypatch)
    cut = transform(chunk_size=3)
    cut(*args)
    assert len(builds) == 1
    cut(*args)
    assert len(builds) == 1


def test_batch_compression_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of 3 rows of 7 entries: 7 directions (one row's), not 21. The first call
    probes the number of directions with a code at most 21 wide, then builds the
    chunk's; calls after it build nothing."""
    builds = _counting_builds(monkeypatch)
    cut = hod.laplacian(_mlp, chunk_size=100)
    x = torch.randn(3, 7, dtype=D)
    assert cut.lower(x).seed_size == 7
    code = cut.lower(x).graph_module
    rows = next(n for n in code.graph.nodes if n.op == "placeholder" and n.name == "t1")
    assert tuple(rows.meta["val"].shape) == (7,)
    cut(x)
    cut(x)
    assert len(builds) == 2


def _largest(lowered) -> int:
    """The most entries of any tensor the generated code computes."""
    sizes = [n.meta["val"].numel() for n in lowered.graph_module.graph.nodes
             if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]
    return max(sizes)


@pytest.mark.parametrize("kind", ["exact", "samples"])
def test_tensors_sized_by_the_chunk(kind: str) -> None:
    """The Laplacian of a network over a batch of 16 rows of 64 entries, hidden width 128:
    the tensors along every direction, ``(R, 16, 128)``, dominate; chunks of 8 of the 64
    directions cut the largest by 8 (allowing for the direction-free ``(16, 128)``)."""
    w1 = torch.randn(64, 128, dtype=D) / 8
    w2 = torch.randn(128, 1, dtype=D) / 8

    def net(x):
        return torch.tanh(torch.tanh(x @ w1) @ w2.expand(128, 4)).sum(-1)

    x = torch.randn(16, 64, dtype=D)
    extra = {} if kind == "exact" else dict(samples=64, generator=_generator())
    whole = _largest(hod.laplacian(net, **extra).lower(x))
    assert whole >= 64 * 16 * 128
    for chunk_size, most in ((8, 8 * 16 * 128), (16, 16 * 16 * 128)):
        assert _largest(hod.laplacian(net, chunk_size=chunk_size, **extra).lower(x)) <= most


def test_biharmonic_tensors_sized_by_the_chunk() -> None:
    """The biharmonic's 36 directions over 6 entries, chunks of 4."""
    def f(y):
        return torch.tanh(y[:, None] * y).exp().sum()

    y = torch.randn(6, dtype=D)
    whole = _largest(hod.biharmonic(f).lower(y))
    assert whole >= 36 * 36
    assert _largest(hod.biharmonic(f, chunk_size=4).lower(y)) <= 4 * 36


def test_jet_and_hvp_accept_chunk_size() -> None:
    """One direction per call: chunk_size changes nothing."""
    x, v = torch.randn(5, dtype=D), torch.randn(5, dtype=D)

    def f(x):
        return x.sin().prod()

    for transform in (lambda **k: hod.jet(f, 3, **k), lambda **k: hod.hvp(f, **k)):
        whole, cut = transform()((x,), v), transform(chunk_size=2)((x,), v)
        for got, want in zip(tree_flatten(cut)[0], tree_flatten(whole)[0], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_memory_limit_suggests_a_chunk() -> None:
    """64 directions through a (64, 256) layer: 128 KiB along them, over a 64 KiB limit;
    the suggested chunk fits and gives the same Laplacian. A jet has one direction:
    nothing to suggest."""
    w = torch.randn(64, 256, dtype=D)

    def f(x):
        return torch.tanh(x @ w).sum()

    x, limit = torch.randn(64, dtype=D), 2**16
    for transform in (hod.laplacian, lambda f, **k: hod.laplacian(f, samples=64, **k)):
        with pytest.raises(MemoryLimitError, match=r"Or: pass chunk_size=32 \(or less\)"):
            transform(f, memory_limit=limit)(x)
    torch.testing.assert_close(hod.laplacian(f, memory_limit=limit, chunk_size=32)(x),
                               hod.laplacian(f)(x), **TOLERANCE[D])
    with pytest.raises(MemoryLimitError) as error:
        hod.jet(f, 2, memory_limit=2**10)((x,), x)
    assert "chunk_size" not in str(error.value)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
@pytest.mark.parametrize("transform", [
    lambda **k: hod.laplacian(_mlp, **k), lambda **k: hod.laplacian(_mlp, samples=3, **k),
    lambda **k: hod.biharmonic(_mlp, **k), lambda **k: hod.operator(_mlp, {(0,): 1.0}, **k),
    lambda **k: hod.jet(_mlp, 2, **k), lambda **k: hod.hvp(_mlp, **k),
], ids=["laplacian", "samples", "biharmonic", "operator", "jet", "hvp"])
def test_bad_chunk_size(transform, bad) -> None:
    with pytest.raises(InputError, match=r"chunk_size must be a positive integer.*\n.*Fix"):
        transform(chunk_size=bad)


def test_group_without_distributed() -> None:
    with pytest.raises(InputError, match=r"laplacian.*group= needs torch.distributed"):
        hod.laplacian(_mlp, group=object())


# -- two ranks ---------------------------------------------------------------------------------
def _cases() -> dict:
    """Per case, the transform (given the cutting keywords) and its arguments; the same on
    every process."""
    torch.manual_seed(0)
    x, y, z = torch.randn(3, 7, dtype=D), torch.randn(4, dtype=D), torch.randn(2, 2, dtype=D)
    v = torch.randn(4, dtype=D)
    return {
        "laplacian": (lambda **k: hod.laplacian(_mlp, **k), (x,)),
        "samples": (lambda **k: hod.laplacian(_mlp, samples=9, generator=_generator(), **k),
                    (x,)),
        "weights": (lambda **k: hod.laplacian(_mixed, weights=_weights(4, D), **k), (y, z)),
        "biharmonic": (lambda **k: hod.biharmonic(_mixed, **k), (y, z)),
        "operator-one-direction": (lambda **k: hod.operator(_mixed, {(0, 0): 1.0}, **k),
                                   (y, z)),
        "value_and_grad": (lambda **k: hod.laplacian(_mlp, value_and_grad=True, **k), (x,)),
        "jet": (lambda **k: _Series(hod.jet(_mixed, 2, **k), v), (y, z)),
        "hvp": (lambda **k: _Series(hod.hvp(_mixed, **k), v), (y, z)),
    }


class _Series:
    """A jet or hvp called like ``f``, along ``v`` in its first argument."""

    def __init__(self, transform, v):
        self.transform, self.v = transform, v

    def __call__(self, *args):
        return self.transform(args, self.v)


def _rank_worker(rank: int, world: int) -> dict:
    """Every case with ``group=`` alone and with ``chunk_size=2``: per result tensor its
    placement and ``full_tensor()``."""
    import torch.distributed as dist

    out = {}
    for name, (transform, args) in _cases().items():
        for chunk_size in (None, 2):
            result = transform(group=dist.group.WORLD, chunk_size=chunk_size)(*args)
            out[name, chunk_size] = [(type(t.placements[0]).__name__, t.full_tensor())
                                     for t in tree_flatten(result)[0]]
    try:
        hod.laplacian(_mlp, group="world")
    except InputError as error:
        out["error"] = str(error)
    return out


PLACEMENTS = {"jet": "Replicate", "hvp": "Replicate"}


def test_two_ranks_equal_one_process() -> None:
    ranks = run_ranks(_rank_worker, 2)
    for rank in ranks:
        assert "group must be a torch.distributed ProcessGroup, got str" in rank["error"]
    for name, (transform, args) in _cases().items():
        want = tree_flatten(transform()(*args))[0]
        for rank in ranks:
            for chunk_size in (None, 2):
                got = rank[name, chunk_size]
                assert len(got) == len(want)
                placements = [p for p, _ in got]
                if name == "value_and_grad":  # u is whole on every rank, lap a sum
                    assert placements[0] == "Replicate" and placements[-1] == "Partial"
                else:
                    assert set(placements) == {PLACEMENTS.get(name, "Partial")}
                for (_, full), expected in zip(got, want, strict=True):
                    torch.testing.assert_close(full, expected, **TOLERANCE[D])
