"""Selects the violation counter implementation: compiled, or the twin on request.

GATEWAY_NO_EXTENSIONS=1 selects the pure-Python twin. Otherwise the compiled
module must load; anything else is an ImportError, never a silent fallback.
"""

import os

from . import is_extension_module

if os.environ.get("GATEWAY_NO_EXTENSIONS") == "1":
    from . import violations_py as implementation
else:
    from . import violations_c as implementation

    if not is_extension_module(implementation):
        raise ImportError(
            f"gateway._fast.violations_c was loaded from source ({implementation.__file__}):"
            " the extension is not built. Build it (pip install -e .) or set"
            " GATEWAY_NO_EXTENSIONS=1 to run the pure-Python twin."
        )

ViolationCounts = implementation.ViolationCounts
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "ViolationCounts")
