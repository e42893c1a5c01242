"""Coverage-guided fuzzing of one target with atheris (libFuzzer for Python).

    python -m fuzz.harness TARGET [libFuzzer options] [corpus directories]

TARGET is one of fuzz.oracles.TARGETS (datagram, batch, capture, sessions, config) or a
compiled fast path when it is built (see `TARGETS` below). The collector package is
instrumented for coverage; numpy and the standard library are not (they are not under
test, and instrumenting them would slow every input down). A failing input is written by
libFuzzer to `-artifact_prefix` (fuzz/run.py sets fuzz/crashes/TARGET/); replay one with

    python -m fuzz.harness TARGET fuzz/crashes/TARGET/crash-...
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["collector", "fuzz"]):
    from fuzz import oracles


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in oracles.TARGETS:
        sys.exit(f"usage: python -m fuzz.harness TARGET [libFuzzer options]; targets: {', '.join(oracles.TARGETS)}")
    check = oracles.TARGETS[argv[1]]
    sys.setrecursionlimit(2000)
    atheris.Setup([argv[0]] + argv[2:], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
