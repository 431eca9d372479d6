"""The bad-input probe (tests/bad_inputs.py) through the real CLI: every case handled as promised."""

import pytest
from bad_inputs import CASES, probe, report

pytestmark = pytest.mark.slow


def test_every_bad_input_gives_one_line_a_non_zero_exit_and_no_output(tmp_path):
    outcomes = probe(tmp_path)
    text = report(outcomes)
    print(text)
    assert len(CASES) >= 30
    expected = f"{len(CASES)} of {len(CASES)} bad inputs handled as promised (100%)"
    assert text.splitlines()[-1] == expected, text
