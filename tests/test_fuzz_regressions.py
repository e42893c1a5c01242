"""Every input a fuzz campaign (or a review of an oracle) found failing is kept in
fuzz/regressions/TARGET/ once fixed, and replayed here through the same check
(fuzz/oracles.py) the fuzzer runs: `python -m fuzz.harness TARGET FILE` replays one too."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.oracles import TARGETS

REGRESSIONS = Path(__file__).resolve().parent.parent / "fuzz" / "regressions"
CASES = sorted(p for p in REGRESSIONS.glob("*/*") if p.is_file())


def test_there_are_regressions_to_replay():
    assert CASES and all(case.parent.name in TARGETS for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_regression(case):
    TARGETS[case.parent.name](case.read_bytes())
