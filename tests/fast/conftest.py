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


# Session scope: Hypothesis refuses function-scoped fixtures in @given tests.
@pytest.fixture(scope="session")
def compiled_bucket() -> type:
    return _compiled("gateway._fast.token_bucket_c").TokenBucket


@pytest.fixture(scope="session")
def python_bucket() -> type:
    return importlib.import_module("gateway._fast.token_bucket_py").TokenBucket


@pytest.fixture(scope="session", params=["compiled", "python"])
def bucket_impl(request: pytest.FixtureRequest) -> type:
    return request.getfixturevalue(f"{request.param}_bucket")


@pytest.fixture(scope="session")
def compiled_violations() -> type:
    return _compiled("gateway._fast.violations_c").ViolationCounts


@pytest.fixture(scope="session")
def python_violations() -> type:
    return importlib.import_module("gateway._fast.violations_py").ViolationCounts


@pytest.fixture(scope="session", params=["compiled", "python"])
def violations_impl(request: pytest.FixtureRequest) -> type:
    return request.getfixturevalue(f"{request.param}_violations")


# The breaker fixtures give the module, not the class: the tests need its state constants too.
@pytest.fixture(scope="session")
def compiled_breaker():
    return _compiled("gateway._fast.breaker_c")


@pytest.fixture(scope="session")
def python_breaker():
    return importlib.import_module("gateway._fast.breaker_py")


@pytest.fixture(scope="session", params=["compiled", "python"])
def breaker_impl(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"{request.param}_breaker")


@pytest.fixture(scope="session")
def compiled_pgcopy():
    return _compiled("gateway._fast.pgcopy_c")


@pytest.fixture(scope="session")
def python_pgcopy():
    return importlib.import_module("gateway._fast.pgcopy_py")


@pytest.fixture(scope="session", params=["compiled", "python"])
def pgcopy_impl(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"{request.param}_pgcopy")


@pytest.fixture(scope="session")
def compiled_ids():
    return _compiled("gateway._fast.ids_c")


@pytest.fixture(scope="session")
def python_ids():
    return importlib.import_module("gateway._fast.ids_py")


@pytest.fixture(scope="session", params=["compiled", "python"])
def ids_impl(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"{request.param}_ids")
