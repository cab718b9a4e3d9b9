"""The ``slow`` marker and ``--runslow`` (tests/conftest.py), run on a small test file."""

from __future__ import annotations

from pathlib import Path

import pytest

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
