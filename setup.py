"""Build the one optional C extension; everything else is in pyproject.toml.

``torchkeep._streamcopy`` makes async-save snapshots with streaming stores (see its source).
It is optional: where it does not compile, torchkeep installs without it and copies with numpy
(the build says so, and so does ``torchkeep --version`` once installed).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """setuptools' build_ext, plus one plain sentence when the optional extension is skipped."""

    def run(self) -> None:
        super().run()
        for ext in self.extensions:
            if not os.path.exists(self.get_ext_fullpath(ext.name)):
                print(
                    f"torchkeep: the optional C extension {ext.name} was not built (no working "
                    "C compiler); torchkeep works without it, async-save snapshots copy with "
                    "numpy instead (`torchkeep --version` says which is in use)",
                    file=sys.stderr,
                )


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "torchkeep._streamcopy",
            sources=["src/torchkeep/_streamcopy.c"],
            optional=True,
        )
    ],
)
