"""Selects the deficit round robin implementation: compiled, or the twin on request.

GATEWAY_NO_EXTENSIONS=1 selects the pure-Python twin. Otherwise the compiled
module must load; anything else is an ImportError, never a silent fallback.
"""

import os

from . import is_extension_module

if os.environ.get("GATEWAY_NO_EXTENSIONS") == "1":
    from . import fairness_py as implementation
else:
    from . import fairness_c as implementation

    if not is_extension_module(implementation):
        raise ImportError(
            f"gateway._fast.fairness_c was loaded from source ({implementation.__file__}):"
            " the extension is not built. Build it (pip install -e .) or set"
            " GATEWAY_NO_EXTENSIONS=1 to run the pure-Python twin."
        )

DeficitRoundRobin = implementation.DeficitRoundRobin
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "DeficitRoundRobin")
