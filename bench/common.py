"""What every benchmark part shares: machine info, medians, the cache, peers installed on
demand, sysctls set for a run and restored.

    from common import machine_info, median, cache_dir, ensure_apt, ensure_pip, sysctls
"""

from __future__ import annotations

import contextlib
import os
import random
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cache_dir(part: str) -> Path:
    """Generated inputs, kept between runs (BENCH_CACHE, default /tmp/collector-bench)."""
    path = Path(os.environ.get("BENCH_CACHE", "/tmp/collector-bench")) / part
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine_info() -> list[str]:
    """CPU model and count, kernel, Python, the load at the start (other jobs show there)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0)
    from collector import compiled
    built = [name for name in ("_fastflow", "_fastcapture", "_fastio")
             if compiled.extension(name) is not None]
    return [f"machine: {model}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}",
            f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; compiled "
            f"extensions: {', '.join(built) or 'none (pure Python)'}"]


def print_header(title: str) -> None:
    print(f"== {title}")
    for line in machine_info():
        print(line)


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def _root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def ensure_apt(command: str, package: str | None = None) -> str | None:
    """The path of `command`, installing its Debian package with apt-get when missing (as
    root, non-interactive); None (and a note) when that is not possible."""
    path = shutil.which(command)
    if path or not shutil.which("apt-get"):
        return path
    if not _root():
        print(f"note: {command} missing and not root: apt-get install {package or command}")
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # tshark asks whether non-root users may capture: preseed "no" so nothing prompts
    subprocess.run(["debconf-set-selections"], input="wireshark-common wireshark-common/"
                   "install-setuid boolean false\n", text=True, check=False)
    for argv in (["apt-get", "install", "-y", "-q", package or command],
                 ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q",
                                                 package or command]):
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
        path = shutil.which(command)
        if path:
            return path
    print(f"note: could not install {package or command} with apt-get")
    return None


def ensure_pip(module: str, package: str | None = None) -> bool:
    """Import `module`, installing `package` with this interpreter's pip when missing."""
    try:
        __import__(module)
        return True
    except ImportError:
        pass
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", package or module],
                            capture_output=True, text=True)
    if result.returncode != 0:
        print(f"note: pip install {package or module} failed: {result.stderr.strip()[-300:]}")
        return False
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@contextlib.contextmanager
def sysctls(values: dict[str, str]):
    """Set /proc/sys values for the block and restore what they were, whatever happens."""
    saved = {}
    try:
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            saved[path] = path.read_text().strip()
            path.write_text(value)
        yield
    finally:
        for path, value in saved.items():
            try:
                path.write_text(value)
            except OSError as err:
                print(f"WARNING: could not restore {path} to {value}: {err}")


def ensure_gcc() -> str | None:
    return ensure_apt("gcc")


def ip_size(rng: random.Random) -> int:
    """An IP packet size of the benchmarks' mix: 40% small (40-100 B), 30% around 576 B,
    30% near the 1500 B MTU."""
    pick = rng.random()
    if pick < 0.4:
        return rng.randint(40, 100)
    if pick < 0.7:
        return rng.randint(552, 600)
    return rng.randint(1400, 1500)
