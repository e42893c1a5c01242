"""The optional compiled core. Everything else is declared in pyproject.toml.

Two C extensions speed up the measured hot paths (issue 6): `collector._fastcore` (capture
record walking, batch decode, flow table) and `collector._fastio` (recvmmsg/sendmmsg into
preallocated slabs). Both are `optional`: where no C compiler exists the build goes on
without them and collector runs on its pure-Python reference implementation (the same one
the tests compare the compiled code against). COLLECTOR_PURE_PYTHON=1 forces that fallback
at run time.
"""

from setuptools import Extension, setup

_FLAGS = ["-O3", "-std=c11", "-Wall", "-Wno-unused-function", "-fno-strict-aliasing"]

setup(
    ext_modules=[
        Extension("collector._fastcore", ["collector/_fastcore.c"], extra_compile_args=_FLAGS,
                  optional=True),
        Extension("collector._fastio", ["collector/_fastio.c"], extra_compile_args=_FLAGS,
                  optional=True),
    ],
)
