"""``chunk_size=`` and ``group=`` on the derivative transforms (``hod._chunked``).

Chunked results are checked against nested torch.func in float64 (and float32) for every
transform, order 1 to 3, single and tuple argnums, pytree arguments, 0-dim leaves,
``has_aux``, ``derivatives``' values, vmap, autograd and compile; that chunked code is
generated once and run once per chunk, its tensors sized by the chunk; the
MemoryLimitError's chunk_size hint, followed, fits; bad keywords fail clearly. The
``group=`` tests run ``tests/distributed_checks.py`` under torchrun with gloo on 2 and 3
CPU processes, each rank comparing its DTensors with the single-process result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES, assert_same_tree, cast, reference
from distributed_checks import D, arguments, scalar, vector
from torch.func import vmap

import hod

CASES = [
    ("hessian", scalar, 2, 0),
    ("hessian", scalar, 2, (0, 1)),
    ("jacobian", vector, 1, (0, 1)),
    ("jacobian", vector, 1, 1),
    ("derivative", vector, 3, (0, 1)),
    ("derivative", scalar, 3, 1),
    ("derivative", scalar, 3, (1, 0)),
]


def transform(name, f, order, argnums, **keywords):
    if name == "derivative":
        return hod.derivative(f, order, argnums, **keywords)
    return getattr(hod, name)(f, argnums, **keywords)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 7])
@pytest.mark.parametrize("name,f,order,argnums", CASES)
def test_chunks_equal_torch_func(name, f, order, argnums, chunk_size):
    args = arguments()
    chunked = transform(name, f, order, argnums, chunk_size=chunk_size)
    assert_same_tree(chunked(*args), reference(f, order, argnums)(*args))


@pytest.mark.parametrize("name,f,order,argnums", CASES)
def test_float32_chunks(name, f, order, argnums):
    args = arguments(torch.float32)
    rtol, atol = TOLERANCES[torch.float32]
    expected = cast(reference(f, order, argnums)(*arguments()), torch.float32)
    actual = transform(name, f, order, argnums, chunk_size=3)(*args)
    assert_same_tree(actual, expected, rtol=rtol, atol=atol)


def test_body_is_generated_once_and_run_per_chunk():
    x, y = arguments()
    fn = hod.hessian(scalar, (0, 1), chunk_size=4)
    lowered = fn.lower(x, y)
    assert (lowered.chunks, lowered.width) == (3, 4)  # 11 seeds: 4 + 4 + 3 (padded)
    assert lowered.body is not None and lowered.whole is None
    fn(x, y)
    fn(x + 1, y)
    assert len(fn._along.function._cache) == 1


def test_one_chunk_holding_every_seed_runs_the_unchunked_code():
    x, y = arguments()
    lowered = hod.hessian(scalar, chunk_size=5).lower(x, y)
    assert lowered.body is None and lowered.whole.mode == hod.hessian(scalar).lower(x, y).mode


def test_a_jacobian_with_few_outputs_is_reverse_mode_whole():
    """A gradient's seed space in reverse mode is its one output: no forward chunks."""
    x, y = arguments()
    fn = hod.jacobian(scalar, chunk_size=2)
    lowered = fn.lower(x, y)
    assert lowered.body is None and str(lowered.whole.mode) != "forward"
    assert_same_tree(fn(x, y), reference(scalar, 1)(x, y))


def test_a_reverse_jacobian_is_cut_along_its_output():
    """3 m <= S: reverse mode's seeds are the output's entries; they are what is cut."""
    w = torch.randn(12, 40, dtype=D)

    def f(x, b):
        return {"y": torch.tanh(w @ x + b.sum()).reshape(3, 4)}

    x, b = torch.randn(40, dtype=D), torch.randn(3, dtype=D)
    for c in (1, 5, 11):
        fn = hod.jacobian(f, (1, 0), chunk_size=c)
        assert fn.lower(x, b).chunks == -(-12 // c)
        assert_same_tree(fn(x, b), reference(f, 1, (1, 0))(x, b))
    values = hod.derivatives(f, 1, chunk_size=5)(x, b)
    assert_same_tree(values, hod.derivatives(f, 1)(x, b))


def largest_tensor(gm) -> int:
    """The most elements of one tensor a generated graph computes."""
    sizes = [n.meta["val"].numel() for n in gm.graph.nodes
             if isinstance(n.meta.get("val"), torch.Tensor)]
    return max(sizes)


def test_tensors_are_sized_by_the_chunk():
    """The third derivative of a vector function in forward mode holds S^3 entries per
    output; chunked, its body holds c S^2."""
    w = torch.randn(40, 40, dtype=D)

    def f(x):
        return torch.tanh(w @ x)

    x = torch.randn(40, dtype=D)
    whole = largest_tensor(hod.derivative(f, 3).lower(x).graph_module)
    for c in (4, 10):
        body = largest_tensor(hod.derivative(f, 3, chunk_size=c).lower(x).body.graph_module)
        assert body <= whole * c / 40 * 1.5, (c, body, whole)


def test_pytrees_and_zero_dim_leaves():
    def f(p, s):
        return (torch.tanh(p["w"] @ p["b"]) * s).pow(3).sum() + s.exp()

    p = {"w": torch.randn(3, 4, dtype=D), "b": torch.randn(4, dtype=D)}
    s = torch.tensor(0.3, dtype=D)
    for argnums in (0, (0, 1), 1):
        assert_same_tree(hod.hessian(f, argnums, chunk_size=5)(p, s),
                         reference(f, 2, argnums)(p, s))


def test_has_aux_and_values():
    x, y = arguments()

    def with_aux(x, y):
        return vector(x, y), {"twice": 2 * x}

    result, aux = hod.derivative(with_aux, 2, has_aux=True, chunk_size=2)(x, y)
    expected, expected_aux = reference(with_aux, 2, has_aux=True)(x, y)
    assert_same_tree(result, expected)
    assert_same_tree(aux, expected_aux)
    for order in (1, 2):
        chunked = hod.derivatives(vector, order, (0, 1), chunk_size=3)(x, y)
        assert_same_tree(chunked, hod.derivatives(vector, order, (0, 1))(x, y))


def test_under_vmap_grad_and_compile():
    xs = torch.randn(3, 5, dtype=D)
    y = arguments()[1]

    def f(x):
        return scalar(x, y)

    chunked = hod.hessian(f, chunk_size=2)
    assert_same_tree(vmap(chunked)(xs), vmap(reference(f, 2))(xs))
    x = xs[0].clone().requires_grad_()
    chunked(x).pow(2).sum().backward()
    x_ref = xs[0].clone().requires_grad_()
    reference(f, 2)(x_ref).pow(2).sum().backward()
    assert_same_tree(x.grad, x_ref.grad)
    compiled = hod.hessian(f, chunk_size=2, compile=True)
    assert_same_tree(compiled(xs[1]), reference(f, 2)(xs[1]))


def test_memory_limit_error_suggests_a_chunk_size_that_fits():
    w = torch.randn(60, 60, dtype=D)

    def f(x):
        return torch.tanh(w @ x)

    x = torch.randn(60, dtype=D)
    limit = 60 * 60 * 60 * 8 // 3  # a third of the unchunked D^2's (60, 60, 60)
    with pytest.raises(hod.MemoryLimitError, match=r"chunk_size=(\d+)") as caught:
        hod.hessian(f, memory_limit=limit)(x)
    chunk = int(re.search(r"chunk_size=(\d+)", str(caught.value)).group(1))
    assert 1 <= chunk < 60
    fitted = hod.hessian(f, memory_limit=limit, chunk_size=chunk)
    assert_same_tree(fitted(x), reference(f, 2)(x))
    with pytest.raises(hod.MemoryLimitError, match="chunk_size="):
        hod.hessian(f, memory_limit=limit, chunk_size=59)(x)


def test_no_chunk_size_is_suggested_when_no_chunk_fits():
    """Here the refused tensor is the captured weight transposed, whatever the chunk."""
    w = torch.randn(2000, 300)

    def f(x):
        return torch.tanh(w @ x).sum()

    with pytest.raises(hod.MemoryLimitError) as caught:
        hod.hessian(f, memory_limit=2_000_000)(torch.randn(300))
    assert "chunk_size" not in str(caught.value)


@pytest.mark.parametrize("keyword,value,message", [
    ("chunk_size", 0, "chunk_size must be a positive integer"),
    ("chunk_size", 2.5, "chunk_size must be a positive integer"),
    ("chunk_size", True, "chunk_size must be a positive integer"),
    ("group", "world", "group= needs torch.distributed to be initialized"),
])
def test_bad_keywords(keyword, value, message):
    with pytest.raises(hod.InputError, match=message):
        hod.hessian(scalar, **{keyword: value})


def test_non_float_argument_is_refused_by_name():
    with pytest.raises(hod.InputError, match=r"hod.hessian\(scalar\).*argument 0"):
        hod.hessian(scalar, chunk_size=2)(torch.arange(5), arguments()[1])


WORKER = Path(__file__).resolve().parent / "distributed_checks.py"


@pytest.mark.parametrize("world", [2, 3])
def test_group_gives_every_rank_its_shard(world, tmp_path):
    """Each rank's DTensors gather to the single-process results (see the worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOD_CHECKS_OUT": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", str(WORKER)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    names = set(reports[0])
    assert len(names) >= 8 and all(set(r) == names for r in reports)
    for rank, report in enumerate(reports):
        for name, check in report.items():
            assert check["error"] <= check["tolerance"], (rank, name, check)
            assert check["fraction"] <= check["most"], (rank, name, check)
