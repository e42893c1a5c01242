"""The optional compiled core. Everything else is declared in pyproject.toml.

Three C extensions speed up the measured hot paths (issue 6): `collector._fastflow` (batch
decode and the flow table behind `Pipeline.feed`), `collector._fastcapture` (capture record
walking and outer-header peeling into receive slabs, for `ingest`) and `collector._fastio`
(recvmmsg/sendmmsg into preallocated slabs). All are `optional`: where no C compiler exists the build goes on
without them and collector runs on its pure-Python reference implementation (the same one
the tests compare the compiled code against). COLLECTOR_PURE_PYTHON=1 forces that fallback
at run time.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExtReplacing(build_ext):
    """An in-place build (`pip install -e .`) that replaces each extension file instead of
    writing over it: copying onto the old file rewrites the inode that running processes (a
    `collector serve`, a test run) have mapped, and they crash. Unlinking it first leaves them
    their old copy and gives new imports the new one."""

    def copy_extensions_to_source(self):
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            fullname = self.get_ext_fullname(ext.name)
            package_dir = build_py.get_package_dir(".".join(fullname.split(".")[:-1]))
            inplace = os.path.join(package_dir, os.path.basename(self.get_ext_filename(fullname)))
            built = os.path.join(self.build_lib, self.get_ext_filename(fullname))
            if os.path.exists(built) and os.path.exists(inplace):
                os.unlink(inplace)
        super().copy_extensions_to_source()


_FLAGS = ["-O3", "-std=c11", "-Wall", "-Wno-unused-function", "-fno-strict-aliasing"]

setup(
    cmdclass={"build_ext": BuildExtReplacing},
    ext_modules=[
        Extension("collector._fastflow", ["collector/_fastflow.c"], extra_compile_args=_FLAGS,
                  optional=True),
        Extension("collector._fastcapture", ["collector/_fastcapture.c"],
                  extra_compile_args=_FLAGS, optional=True),
        Extension("collector._fastio", ["collector/_fastio.c"], extra_compile_args=_FLAGS,
                  optional=True),
    ],
)
