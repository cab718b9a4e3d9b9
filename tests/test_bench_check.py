"""The benchmark harness's correctness check: it fails a 1% error, compares thoad's blocks in
torch.func's layout, marks a row without a usable reference ``unchecked`` and leaves such rows
and untimed settings out of the tables' ratios."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench import runner as bench_runner
from bench.compare import compare_blocks
from bench.engines import expand_engine_names, make_engines
from bench.models import Case, make_inputs
from bench.reference import DegenerateReference, reference
from bench.runner import OK, SKIPPED, UNCHECKED, EngineResult, RunSettings, SweepRunner
from bench.selfcheck import CASES, verdicts
from bench.tables import ratio, summary_grid, sweep_grid
from bench.thoad_worker import expanded_block
from bench.timing import QUICK_POLICY


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label())
def test_check_passes_honest_results_and_fails_one_percent_errors(case: Case):
    results = verdicts(case)
    assert len(results) >= 7
    wrong = [(what, passed) for what, expected, passed in results if expected != passed]
    assert not wrong


def test_every_block_of_a_deep_row_is_far_from_zero():
    case = Case("relu_softmax", 2, True, 10, 20, 10)  # deep: the seed's rand inputs saturate
    ref = reference(case, make_inputs(case, 0))
    assert ref.smallest_block > 1e-3 * ref.scale
    seed_case = replace(case, readout="sum")
    with pytest.raises(DegenerateReference):
        reference(seed_case, make_inputs(seed_case, 0))


class _FakeThoadControl:
    """Answers fetch_hgrad as thoad does for a scalar output: a leading size-1 axis."""

    def __init__(self, block: torch.Tensor) -> None:
        self.block = block

    def fetch_hgrad(self, variables, keep_batch):
        assert keep_batch is False
        return self.block, None


def test_thoad_blocks_are_put_in_torch_func_layout():
    x, w = torch.zeros(3, 4), torch.zeros(4, 4)
    full = torch.randn(1, 3, 4, 4, 4)
    assert torch.equal(expanded_block(_FakeThoadControl(full), (x, w)), full[0])
    ref = {(0, 1): full[0].double()}
    assert compare_blocks({(0, 1): expanded_block(_FakeThoadControl(full), (x, w))}, ref).ok
    # Another layout with the same number of elements is passed on, and the check fails it.
    odd = torch.randn(1, 4, 4, 3, 4)
    got = {(0, 1): expanded_block(_FakeThoadControl(odd), (x, w))}
    assert not compare_blocks(got, ref).ok


def test_a_row_without_reference_is_unchecked_and_left_out_of_ratios(monkeypatch):
    def failing_reference(*args):
        raise RuntimeError("no reference today")

    monkeypatch.setattr(bench_runner, "reference", failing_reference)
    engines = make_engines(["torch.func[fwd-rev]", "autograd.functional[seed]"], 10.0)
    sweep_runner = SweepRunner(engines, RunSettings("cpu", QUICK_POLICY, 5.0), log=lambda _: None)
    row = sweep_runner.run_row(Case("tanh", 1, False, 3, 4, 2), 3, {})
    statuses = {name: r.status for name, r in row.engines.items()}
    assert statuses == {"torch.func[fwd-rev]": UNCHECKED, "autograd.functional[seed]": UNCHECKED}
    assert "reference failed" in row.reference
    data = row.to_dict()
    assert ratio(data, "torch.func", hod="autograd.functional[seed]") is None
    assert "(unchecked)" in sweep_grid({"x_name": "batch", "rows": [data]})[1][1]


def _row(x: int, **medians: float | str) -> dict:
    engines = {}
    for name, value in medians.items():
        name = name.replace("__", ".").replace("_", "-")
        if isinstance(value, str):
            engines[name] = {"status": value, "median_ms": None, "detail": ""}
        else:
            engines[name] = {"status": OK, "median_ms": value, "detail": ""}
    return {"x": x, "label": f"row {x}", "case": {"order": 2}, "engines": engines}


def test_tables_compare_hod_with_each_peers_best_setting():
    rows = [
        _row(1, hod=1.0, **{"torch.func[fwd-rev]": 6.0, "torch.func[rev]": 3.0, "thoad": 9.0}),
        _row(2, hod=2.0, **{"torch.func[fwd-rev]": 5.0, "torch.func[rev]": SKIPPED,
                            "thoad": "WRONG"}),
    ]
    run = {"sweeps": [{"name": "hess_x_batch", "title": "t", "x_name": "batch", "rows": rows}]}
    header, line = summary_grid(run)
    assert header[2:] == ["hod vs the best peer", "vs torch.func", "vs thoad"]
    assert line[2] == "2.50 / 2.75 / 3.00"  # 3.0/1.0 and 5.0/2.0
    assert line[3].startswith("2.50 / 2.75 / 3.00") and "rev 1" in line[3]
    assert line[4] == "9.00 / 9.00 / 9.00 (1 of 2 rows)"


def test_a_peer_name_selects_all_its_settings():
    names = expand_engine_names(["hod", "autograd.functional", "torch.func[rev]"])
    assert names == ["hod", "torch.func[rev]", "autograd.functional[seed]",
                     "autograd.functional[vectorize]", "autograd.functional[vectorize-fwd]"]
    with pytest.raises(ValueError, match="unknown engines"):
        expand_engine_names(["torch.fun"])


def test_a_hopeless_setting_is_not_timed_against_its_own_peer_only():
    results = {
        "torch.func[fwd-rev]": EngineResult(OK, warmup_ms=10.0),
        "torch.func[rev]": EngineResult(OK, warmup_ms=150.0),
        "autograd.functional[seed]": EngineResult(OK, warmup_ms=50.0),
        "autograd.functional[vectorize]": EngineResult(OK, warmup_ms=1.0),
        "thoad": EngineResult(OK, warmup_ms=500.0),
    }
    peers = {name: name.split("[")[0] for name in results}
    # autograd.functional[seed] is 50x slower but short: a noisy warm-up must not drop it.
    assert list(bench_runner.hopeless_settings(results, peers)) == ["torch.func[rev]"]
    # Settings over 2x behind a rival are timed with the minimum number of calls only.
    assert bench_runner.trailing_settings(results, peers, 5) == {
        "torch.func[rev]": 5, "autograd.functional[seed]": 5}
