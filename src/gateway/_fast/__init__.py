"""The compiled hot path: per-request arithmetic built with Cython.

Each fast module `<name>` has a pure-Python twin `<name>_py`, which is the one
source; `<name>_c` is the same source compiled with the C types of
`<name>_c.pxd`. The selector `<name>` loads the compiled module, or the twin
when GATEWAY_NO_EXTENSIONS=1, and names the one it loaded `implementation`.
It never falls back silently: an unbuilt or broken extension is an
ImportError, not a slower gateway.
"""

import importlib
import os
import importlib.machinery
import pkgutil
from types import ModuleType


def is_extension_module(module: ModuleType) -> bool:
    """Whether `module` was loaded from a compiled extension, not from source."""
    # `<name>_c` also imports from its `.py` symlink when nothing is built, so
    # a successful import alone proves nothing.
    path = getattr(module, "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules() -> dict[str, bool]:
    """For each fast module, whether the implementation its selector loaded is compiled."""
    names = sorted(
        info.name.removesuffix("_py")
        for info in pkgutil.iter_modules(__path__)
        if info.name.endswith("_py")
    )
    return {
        name: is_extension_module(importlib.import_module(f"{__name__}.{name}").implementation)
        for name in names
    }


def select(name: str) -> ModuleType:
    """The implementation of fast module `name` a selector exports: the compiled one, or the twin on request.

    GATEWAY_NO_EXTENSIONS=1 selects the pure-Python twin `<name>_py`.
    Otherwise `<name>_c` must load compiled; anything else is an ImportError,
    never a silent fallback.
    """
    if os.environ.get("GATEWAY_NO_EXTENSIONS") == "1":
        return importlib.import_module(f"{__name__}.{name}_py")
    module = importlib.import_module(f"{__name__}.{name}_c")
    if not is_extension_module(module):
        raise ImportError(
            f"{__name__}.{name}_c was loaded from source ({module.__file__}): the extension is not built."
            " Build it (pip install -e .) or set GATEWAY_NO_EXTENSIONS=1 to run the pure-Python twin."
        )
    return module
