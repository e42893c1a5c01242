"""The short version of the hostile-traffic run (fuzz/hostile_serve.py; the full run of
1,000,000 datagrams is reported in docs/robustness.md): every kind of broken datagram into a
real `collector serve`, which keeps running and healthy, and whose counters account for every
datagram sent."""

from __future__ import annotations

from fuzz import hostile
from fuzz.hostile_serve import run


def test_hostile_datagrams_into_a_live_serve(tmp_path):
    report = run(count=11 * 500, seed=3, pps=20000, workdir=str(tmp_path))
    assert report["checks"] == {name: True for name in report["checks"]}, report
    assert set(report["kinds"]) == set(hostile.KINDS)
    assert report["decoded"] > 0 and report["malformed"] > 0
    # each reason the decoder has is reached by some kind
    assert len(report["malformed_by_reason"]) >= 8, report["malformed_by_reason"]
    assert report["largest"]["jumbo"] > 9000 and report["largest"]["zero_length"] == 0
    # thousands of random VNIs: one label each up to the bound, then one "other" label
    assert report["session_labels"] == 1024 + 1, report["session_labels"]
