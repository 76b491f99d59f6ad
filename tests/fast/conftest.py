"""Fixtures giving each fast implementation: the compiled module and its twin.

The compiled parameter fails, never skips, when the extension is not built,
unless GATEWAY_NO_EXTENSIONS=1 says the build was skipped on purpose.
"""

import importlib
import os

import pytest

from gateway._fast import is_extension_module


def _compiled(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        reason = f"{module_name} does not import: {exc}"
    else:
        if is_extension_module(module):
            return module
        # The `_c.py` symlink imports fine without a build; that is the twin
        # under another name, not the compiled code.
        reason = f"{module_name} loaded from source {module.__file__}: the extension is not built"
    if os.environ.get("GATEWAY_NO_EXTENSIONS") == "1":
        pytest.skip(f"{reason} (GATEWAY_NO_EXTENSIONS=1)")
    pytest.fail(reason, pytrace=False)


def _twins(name: str, module: str, attribute: str | None = None):
    """The fixtures `compiled_<name>`, `python_<name>` and `<name>_impl` (both, one per test) for fast module
    `module`: the module itself, or its `attribute` (a class). Session scope: Hypothesis refuses
    function-scoped fixtures in @given tests."""

    def pick(loaded):
        return loaded if attribute is None else getattr(loaded, attribute)

    @pytest.fixture(scope="session", name=f"compiled_{name}")
    def compiled():
        return pick(_compiled(f"gateway._fast.{module}_c"))

    @pytest.fixture(scope="session", name=f"python_{name}")
    def python():
        return pick(importlib.import_module(f"gateway._fast.{module}_py"))

    @pytest.fixture(scope="session", params=["compiled", "python"], name=f"{name}_impl")
    def either(request: pytest.FixtureRequest):
        return request.getfixturevalue(f"{request.param}_{name}")

    return compiled, python, either


compiled_bucket, python_bucket, bucket_impl = _twins("bucket", "token_bucket", "TokenBucket")
compiled_violations, python_violations, violations_impl = _twins("violations", "violations", "ViolationCounts")
# The module, not a class, for the rest: their tests need its constants and functions too.
compiled_breaker, python_breaker, breaker_impl = _twins("breaker", "breaker")
compiled_pgcopy, python_pgcopy, pgcopy_impl = _twins("pgcopy", "pgcopy")
compiled_ids, python_ids, ids_impl = _twins("ids", "ids")
compiled_auditentry, python_auditentry, auditentry_impl = _twins("auditentry", "auditentry")
compiled_windows, python_windows, windows_impl = _twins("windows", "windows")
compiled_intake, python_intake, intake_impl = _twins("intake", "intake")
