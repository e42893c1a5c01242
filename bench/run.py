"""`make bench`: every part of the benchmark suite (issue 6), or the ones named.

    python bench/run.py [PART ...]        # parts: ingest drain live replay flows growth
    make bench [PART=drain]

Each part is its own script (bench/<part>.py, runnable alone with more options); this runs
them one after the other with the settings BENCHMARKS.md reports, as fresh processes, and
keeps each part's output in $BENCH_CACHE/results/<part>.txt (default /tmp/collector-bench)
besides printing it. Peers are installed by the parts when missing (apt-get: tshark,
tcpreplay, gcc; pip: nfstream); generated inputs are cached under $BENCH_CACHE, so a second
run skips generating them. A failing part is reported and the others still run; the exit
status says whether all passed. Budget: about 30 minutes on a quiet 2-CPU machine with the
inputs to generate, less once they are cached.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_dir, print_header  # noqa: E402

BENCH = Path(__file__).resolve().parent
PARTS = {
    "ingest": ["ingest.py", "--packets", "1000000", "--flows", "10000", "--runs", "3"],
    "drain": ["drain.py", "--count", "300000", "--runs", "3", "--workers", "1,2", "--profile"],
    "live": ["live.py", "--hold", "10", "--confirm", "30", "--workers", "1,2",
             "--start", "40000", "--bisect", "2"],
    "replay": ["replay.py", "--packets", "200000", "--flows", "2000", "--runs", "3"],
    "flows": ["flows.py", "--active", "1000000", "--rows", "10000000", "--runs", "3"],
    "growth": ["growth.py"],
}


def main(argv: list[str]) -> int:
    wanted = argv or list(PARTS)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        print(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
        return 2
    print_header(f"collector benchmark suite: {', '.join(wanted)}")
    results = cache_dir("results")
    failed = []
    for part in wanted:
        script = BENCH / PARTS[part][0]
        if not script.exists():
            print(f"\n-- {part}: {script.name} is not in this tree; skipped")
            continue
        command = [sys.executable, str(script), *PARTS[part][1:]]
        print(f"\n-- {part}: {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        with open(results / f"{part}.txt", "w") as log:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, bufsize=1)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            proc.wait()
        minutes = (time.monotonic() - started) / 60
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"-- {part}: {status} in {minutes:.1f} min (output in {results / (part + '.txt')})",
              flush=True)
        if proc.returncode != 0:
            failed.append(part)
    if failed:
        print(f"\nfailed parts: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
