"""The optional compiled core. Everything else is declared in pyproject.toml.

Three C extensions speed up the measured hot paths (issue 6): `collector._fastflow` (batch
decode and the flow table behind `Pipeline.feed`), `collector._fastcapture` (capture record
walking and outer-header peeling into receive slabs, for `ingest`) and `collector._fastio`
(recvmmsg/sendmmsg into preallocated slabs). All are `optional`: where no C compiler exists the build goes on
without them and collector runs on its pure-Python reference implementation (the same one
the tests compare the compiled code against). COLLECTOR_PURE_PYTHON=1 forces that fallback
at run time.
"""

from setuptools import Extension, setup

_FLAGS = ["-O3", "-std=c11", "-Wall", "-Wno-unused-function", "-fno-strict-aliasing"]

setup(
    ext_modules=[
        Extension("collector._fastflow", ["collector/_fastflow.c"], extra_compile_args=_FLAGS,
                  optional=True),
        Extension("collector._fastcapture", ["collector/_fastcapture.c"],
                  extra_compile_args=_FLAGS, optional=True),
        Extension("collector._fastio", ["collector/_fastio.c"], extra_compile_args=_FLAGS,
                  optional=True),
    ],
)
