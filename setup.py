"""Build the compiled core (gateway/_fast).

Each compiled module is one plain-Python source (`<name>_py.py`, the twin)
plus an augmenting `<name>_c.pxd` that adds C types; `<name>_c.py` is a
symlink to the twin, so Cython compiles the very same code under a second
name and the two cannot drift (the aiohttp `_websocket/reader` pattern).
A module whose speed is in what plain Python cannot say (C-level reads of
Python objects: `pgcopy`) is a `<name>_c.pyx` of its own beside its twin,
and its tests hold the two to the same results.

GATEWAY_CYTHON_DEBUG=1 builds with line tracing and writes annotated HTML.
GATEWAY_NO_EXTENSIONS=1 skips the build; the runtime then needs the same
variable to select the twins (it never falls back silently).
"""

import os
import pathlib

from setuptools import setup

HERE = pathlib.Path(__file__).parent
FAST = HERE / "src" / "gateway" / "_fast"

ext_modules = []
if os.environ.get("GATEWAY_NO_EXTENSIONS") != "1":
    from Cython.Build import cythonize
    from setuptools import Extension

    debug = os.environ.get("GATEWAY_CYTHON_DEBUG") == "1"
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if debug else []
    extensions = [
        Extension(
            f"gateway._fast.{pxd.stem}",
            [str(pxd.with_suffix(".py").relative_to(HERE))],
            define_macros=macros,
            # No fused multiply-add: the compiled arithmetic must round exactly
            # like the Python twin's, or the two could decide differently.
            extra_compile_args=["-O2", "-ffp-contract=off"],
        )
        for pxd in sorted(FAST.glob("*_c.pxd"))
    ] + [
        Extension(
            f"gateway._fast.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            define_macros=macros,
            extra_compile_args=["-O2", "-ffp-contract=off"],
        )
        for pyx in sorted(FAST.glob("*_c.pyx"))
    ]
    directives = {
        "language_level": "3",
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "embedsignature": True,
    }
    if debug:
        directives.update(linetrace=True, profile=True)
    ext_modules = cythonize(extensions, compiler_directives=directives, annotate=debug)

setup(ext_modules=ext_modules)
