"""The soak (bench/soak.py, `make soak`: 10 minutes, 100,000 flows) in a CI-sized run: 15 s
at 3,000 datagrams/s over 10,000 concurrent flows with churn, two workers; every datagram
reconciled to the counters and to its flow's row in the dataset."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the soak's sender is built with gcc")
def test_short_soak_reconciles_every_datagram(capsys):
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # its dataclasses look their module up
    try:
        spec.loader.exec_module(soak)
    finally:
        sys.modules.pop("soak", None)
    code = soak.main(["--minutes", "0.25", "--rate", "3000", "--flows", "10000", "--rounds", "6",
                      "--workers", "2", "--idle-timeout", "5", "--flush-seconds", "2",
                      "--report-seconds", "5", "--rss-growth", "0.5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok   per flow" in out and "0 with a different packet count" in out
