"""Replay and mutate fuzz inputs through the compiled extensions built with AddressSanitizer
and UBSan: out-of-bounds reads that do not change a result (so the differential checks cannot
see them) abort here with a report.

    python fuzz/asan.py [--iterations 20000] [--seed 1]

Builds collector/_fastflow.c and collector/_fastcapture.c with `gcc -fsanitize=address,undefined`
into fuzz/work/asan/, re-executes itself with libasan preloaded, loads those builds as
collector._fastflow / collector._fastcapture, then runs the fastflow and fastcapture checks of
fuzz/oracles.py over every corpus file in fuzz/work/corpus/ (grown by `make fuzz`), the seeds,
and `--iterations` random mutations of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "work" / "asan"
MODULES = ("_fastflow", "_fastcapture")


def build() -> None:
    BUILD.mkdir(parents=True, exist_ok=True)
    include = sysconfig.get_paths()["include"]
    for name in MODULES:
        # built beside, then renamed over: a process that has the old build loaded keeps its
        # file (rewriting a mapped .so in place crashes that process with SIGBUS)
        partial = BUILD / f"{name}.so.{os.getpid()}"
        subprocess.run(["gcc", "-shared", "-fPIC", "-g", "-O1", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                        f"-I{include}", str(ROOT / "collector" / f"{name}.c"),
                        "-o", str(partial)], check=True)
        os.replace(partial, BUILD / f"{name}.so")


def load() -> None:
    for name in MODULES:
        spec = importlib.util.spec_from_file_location(f"collector.{name}", BUILD / f"{name}.so")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"collector.{name}"] = module
        spec.loader.exec_module(module)


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        if not data:
            data = bytearray(rng.randbytes(rng.randrange(1, 64)))
        at = rng.randrange(len(data))
        action = rng.randrange(5)
        if action == 0:
            data[at] = rng.randrange(256)
        elif action == 1:
            data[at:at] = rng.randbytes(rng.randrange(1, 9))
        elif action == 2:
            del data[at : at + rng.randrange(1, 9)]
        elif action == 3:
            del data[at:]
        else:
            data[at : at + 4] = rng.choice((b"\xff\xff\xff\xff", b"\0\0\0\0", b"\xfc\xff\xff\x7f"))
    return bytes(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if os.environ.get("COLLECTOR_ASAN_CHILD") != "1":
        build()
        libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        env = dict(os.environ, COLLECTOR_ASAN_CHILD="1", LD_PRELOAD=libasan,
                   ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        return subprocess.run([sys.executable, *sys.argv], env=env).returncode
    sys.path.insert(0, str(ROOT))
    load()
    from fuzz import oracles, seeds

    from collector.flows import fast

    # the sanitized builds are the ones under test (not the installed ones)
    assert fast._ext is sys.modules["collector._fastflow"] and "fastcapture" in oracles.TARGETS
    assert all(Path(sys.modules[f"collector.{m}"].__file__).parent == BUILD for m in MODULES)
    rng = random.Random(args.seed)
    for target in ("fastflow", "fastcapture"):
        check = oracles.TARGETS[target]
        inputs = list(seeds.SEEDS[target]())
        corpus = HERE / "work" / "corpus" / target
        if corpus.is_dir():
            inputs += [p.read_bytes() for p in sorted(corpus.iterdir())]
        for data in inputs:
            check(data)
        for _ in range(args.iterations):
            check(mutate(rng, rng.choice(inputs)))
        print(f"{target}: {len(inputs)} corpus inputs and {args.iterations} mutations, "
              "no sanitizer report, no disagreement", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
