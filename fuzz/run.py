"""Run every fuzz target for a bounded time and keep what fails: `make fuzz`.

    python fuzz/run.py [--seconds 60] [--targets datagram,batch,...]

For each target: write its seed corpus (fuzz/seeds.py) to fuzz/work/corpus/TARGET, run
`python -m fuzz.harness TARGET` for the time given, and when libFuzzer stops at a failing
input, keep it in fuzz/crashes/TARGET/ and go on fuzzing for the time that is left (the
corpus grown so far is kept). Prints one line per target (runs, corpus, coverage, peak RSS,
failing inputs) and exits 1 if any target found one. Replay a saved input with
`python -m fuzz.harness TARGET fuzz/crashes/TARGET/crash-...`; once fixed, copy it to
fuzz/regressions/TARGET/ (committed), which tests/test_fuzz_regressions.py replays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from fuzz import oracles, seeds  # noqa: E402


def write_seeds(target: str, corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for data in seeds.SEEDS[target]():
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()}").write_bytes(data)


def fuzz(target: str, seconds: float, rss_limit_mb: int) -> dict:
    corpus = HERE / "work" / "corpus" / target
    crashes = HERE / "crashes" / target
    crashes.mkdir(parents=True, exist_ok=True)
    write_seeds(target, corpus)
    log_path = HERE / "work" / f"{target}.log"
    totals = {"target": target, "seconds": seconds, "runs": 0, "failures": [], "peak_rss_mb": 0,
              "coverage": 0, "corpus": 0}
    deadline = time.monotonic() + seconds
    with open(log_path, "w") as log:
        while (left := deadline - time.monotonic()) > 1:
            before = set(crashes.iterdir())
            proc = subprocess.run(
                [sys.executable, "-m", "fuzz.harness", target, f"-max_total_time={int(left)}",
                 f"-artifact_prefix={crashes}/", f"-rss_limit_mb={rss_limit_mb}", "-timeout=20",
                 "-print_final_stats=1", "-max_len=4096", str(corpus)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
            log.write(proc.stdout)
            _add_stats(totals, proc.stdout)
            found = sorted(set(crashes.iterdir()) - before)
            totals["failures"] += [str(p.relative_to(ROOT)) for p in found]
            if proc.returncode == 0 or not found:
                break  # time is up (or the fuzzer failed without an input to keep: see the log)
    totals["corpus"] = sum(1 for _ in corpus.iterdir())
    totals["log"] = str(log_path.relative_to(ROOT))
    return totals


def _add_stats(totals: dict, output: str) -> None:
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    if runs is None:  # a crash: libFuzzer prints no final stats, take the last status line
        lines = re.findall(r"^#(\d+)\s", output, re.M)
        runs = lines[-1] if lines else "0"
    else:
        runs = runs.group(1)
    totals["runs"] += int(runs)
    rss = [int(x) for x in re.findall(r"rss: (\d+)Mb", output)]
    rss += [int(x) for x in re.findall(r"stat::peak_rss_mb:\s*(\d+)", output)]
    totals["peak_rss_mb"] = max([totals["peak_rss_mb"]] + rss)
    cov = [int(x) for x in re.findall(r"cov: (\d+)", output)]
    if cov:
        totals["coverage"] = max(totals["coverage"], cov[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--targets", default=",".join(oracles.TARGETS),
                        help=f"comma-separated, from: {', '.join(oracles.TARGETS)}")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    args = parser.parse_args()
    results = []
    for target in args.targets.split(","):
        if target not in oracles.TARGETS:
            parser.error(f"unknown target {target!r}")
        result = fuzz(target, args.seconds, args.rss_limit_mb)
        results.append(result)
        print(f"{target:10} {result['runs']:>10,} runs in {args.seconds:.0f} s  corpus {result['corpus']:>5}"
              f"  coverage {result['coverage']:>5}  peak RSS {result['peak_rss_mb']} MB"
              f"  failing inputs {len(result['failures'])}", flush=True)
        for path in result["failures"]:
            print(f"    {path}", flush=True)
    (HERE / "work" / "summary.json").write_text(json.dumps(results, indent=1))
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
