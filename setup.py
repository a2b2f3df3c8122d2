"""Build the one optional C extension; everything else is in pyproject.toml.

``torchkeep._streamcopy`` makes async-save snapshots with streaming stores (see its source).
It is optional: where it does not compile, torchkeep installs without it and copies with numpy.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "torchkeep._streamcopy",
            sources=["src/torchkeep/_streamcopy.c"],
            optional=True,
        )
    ]
)
