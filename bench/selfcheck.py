"""Shows that the bench's correctness check passes honest results and fails a 1% error.

Run from the repository root::

    python -m bench.selfcheck

On a few small rows (a Jacobian, a Hessian and an order-3 derivative w.r.t. X and the weights)
it computes the row's float64 reference and an honest float32 result (torch.func in float32, as
an engine computes it), then applies :func:`bench.compare.compare_blocks` to that
result and to spoiled copies of it: every block scaled by 1.01, the smallest block alone scaled
by 1.01, one entry of the smallest block moved by 1% of that block's largest entry, a missing
block, a transposed block, all zeros. The honest result must pass and every spoiled one fail;
the seed's constant read-out must be refused as a degenerate reference. Exits with status 1 if any
of that does not hold. ``tests/test_bench_check.py`` runs the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

import torch

from bench.compare import Blocks, compare_blocks, flatten_nested
from bench.engines import torch_func_derivative
from bench.models import Case, make_inputs
from bench.reference import DegenerateReference, reference

#: Small rows: (model, order, param_grad, batch, width, depth).
CASES = (
    Case("relu_softmax", 1, True, 6, 5, 3),
    Case("relu_softmax", 2, True, 4, 5, 3),
    Case("tanh", 3, True, 2, 3, 2),
)


def honest_result(case: Case, inputs: tuple[torch.Tensor, ...]) -> Blocks:
    """torch.func's float32 result: what an honest engine returns."""
    fn = torch_func_derivative(case.forward(), case.order, case.argnums)
    return flatten_nested(fn(*inputs), case.order, case.argnums)


def _smallest(ref: Blocks) -> tuple[int, ...]:
    return min(ref, key=lambda k: float(ref[k].abs().max()))


def _nudged(block: torch.Tensor) -> torch.Tensor:
    """``block`` with its largest entry moved by 1% of its own magnitude."""
    out = block.contiguous().clone()
    flat = out.view(-1)
    i = int(flat.abs().argmax())
    flat[i] += 0.01 * flat[i].abs()
    return out


def spoilers(ref: Blocks) -> dict[str, Callable[[Blocks], Blocks]]:
    """Named ways of spoiling a result; each must make the check fail."""
    small = _smallest(ref)
    square = next((k for k in ref if ref[k].dim() == 2 and ref[k].shape[0] == ref[k].shape[1]
                   and not torch.allclose(ref[k], ref[k].T, rtol=1e-2)), None)
    cases: dict[str, Callable[[Blocks], Blocks]] = {
        "every block x 1.01": lambda b: {k: v * 1.01 for k, v in b.items()},
        f"smallest block {small} x 1.01": lambda b: {**b, small: b[small] * 1.01},
        f"one entry of block {small} moved by 1%": lambda b: {**b, small: _nudged(b[small])},
        f"block {small} missing": lambda b: {k: v for k, v in b.items() if k != small},
        "all zeros": lambda b: {k: torch.zeros_like(v) for k, v in b.items()},
    }
    if square is not None:
        cases[f"block {square} transposed"] = lambda b: {**b, square: b[square].T}
    return cases


def verdicts(case: Case) -> list[tuple[str, bool, bool]]:
    """(what, expected to pass, passed) for the honest result and each spoiled one on
    ``case``, and for the reference of the seed's read-out (refused when degenerate)."""
    inputs = make_inputs(case, seed=0)
    ref = reference(case, inputs).blocks
    honest = honest_result(case, inputs)
    out = [("honest float32 result", True, compare_blocks(honest, ref).ok)]
    for name, spoil in spoilers(ref).items():
        out.append((name, False, compare_blocks(spoil(honest), ref).ok))
    seed_case = replace(case, readout="sum")
    try:
        reference(seed_case, make_inputs(seed_case, seed=0))
        accepted = True
    except DegenerateReference:
        accepted = False
    # The seed's read-out of the relu/softmax MLP is constant: its reference must be refused.
    out.append(("the seed's read-out as reference", case.model != "relu_softmax", accepted))
    return out


def main() -> None:
    failures = 0
    for case in CASES:
        print(case.label())
        for what, expected, passed in verdicts(case):
            good = expected == passed
            failures += not good
            verdict = "passes" if passed else "fails"
            print(f"  {'ok ' if good else 'BAD'} {what}: {verdict}")
    if failures:
        print(f"{failures} verdicts differ from what the check must give")
        sys.exit(1)
    print("the check passes honest results and fails every 1% error tried")


if __name__ == "__main__":
    main()
