"""The suite's own helpers (tests/conftest.py): the comparison that refuses a zero
reference, and ``--runslow`` with the ``slow`` marker, run on a small test file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_same_tree

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.mark.parametrize("options, passed, deselected", [
    (("-m", "not slow"), 1, 1),
    (("-m", "not slow", "--runslow"), 2, 0),
    (("-m", "slow"), 1, 1),
])
def test_runslow_adds_the_slow_tests_to_a_marker_subset(pytester, options, passed, deselected):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: left out of the quick subset\n")
    pytester.makepyfile(test_two="""
        import pytest

        def test_quick():
            pass

        @pytest.mark.slow
        def test_slow():
            pass
    """)
    result = pytester.runpytest(*options)
    result.assert_outcomes(passed=passed, deselected=deselected)


def test_a_zero_reference_fails_unless_expected():
    zeros, small = torch.zeros(3, dtype=torch.float64), torch.full((3,), 1e-12, dtype=torch.float64)
    for reference in (zeros, small, (zeros, {"a": small})):
        with pytest.raises(AssertionError, match="nearly"):
            assert_same_tree(reference, reference)
        assert_same_tree(reference, reference, expect_zero=True)
    with pytest.raises(AssertionError, match="nearly"):  # zeros would pass at this tolerance
        assert_same_tree(torch.ones(3), torch.ones(3), rtol=0, atol=0.6)
    one = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert_same_tree(one, one)
    assert_same_tree((zeros, one), (zeros, one))  # one leaf not zero is enough
    with pytest.raises(AssertionError, match="zero reference was expected"):
        assert_same_tree(one, one, expect_zero=True)
