"""Which token bucket the selector loads, and that it never falls back silently."""

import importlib
import os
import pathlib
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES

from gateway import _fast
from gateway._fast import compiled_modules, token_bucket_py

NO_EXTENSIONS = os.environ.get("GATEWAY_NO_EXTENSIONS") == "1"
FAST_DIR = pathlib.Path(_fast.__file__).parent


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_selector_loads_the_compiled_module_unless_told_not_to():
    # Imported here, not at the top: an unbuilt extension then fails this test
    # instead of aborting the collection of the whole directory.
    token_bucket = importlib.import_module("gateway._fast.token_bucket")
    if NO_EXTENSIONS:
        assert token_bucket.COMPILED is False
        assert token_bucket.implementation is token_bucket_py
    else:
        assert token_bucket.COMPILED is True
        assert token_bucket.implementation.__name__ == "gateway._fast.token_bucket_c"
        assert token_bucket.implementation.__file__.endswith(tuple(EXTENSION_SUFFIXES))
    assert token_bucket.TokenBucket is token_bucket.implementation.TokenBucket


def test_compiled_modules_reports_the_selection():
    assert compiled_modules() == {
        "auditentry": not NO_EXTENSIONS,
        "breaker": not NO_EXTENSIONS,
        "fairness": not NO_EXTENSIONS,
        "ids": not NO_EXTENSIONS,
        "intake": not NO_EXTENSIONS,
        "pgcopy": not NO_EXTENSIONS,
        "screen": not NO_EXTENSIONS,
        "token_bucket": not NO_EXTENSIONS,
        "violations": not NO_EXTENSIONS,
        "windows": not NO_EXTENSIONS,
    }


def test_no_extensions_selects_the_twin():
    result = _run_python(
        "from gateway._fast import token_bucket as s, compiled_modules;"
        "print(s.COMPILED, s.TokenBucket.__module__, compiled_modules())",
        GATEWAY_NO_EXTENSIONS="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "False",
        "gateway._fast.token_bucket_py",
        "{'auditentry':",
        "False,",
        "'breaker':",
        "False,",
        "'fairness':",
        "False,",
        "'ids':",
        "False,",
        "'intake':",
        "False,",
        "'pgcopy':",
        "False,",
        "'screen':",
        "False,",
        "'token_bucket':",
        "False,",
        "'violations':",
        "False,",
        "'windows':",
        "False}",
    ]


def test_every_selector_loads_the_compiled_module_unless_told_not_to():
    for name in compiled_modules():
        selector = importlib.import_module(f"gateway._fast.{name}")
        if NO_EXTENSIONS:
            assert selector.COMPILED is False
            assert selector.implementation.__name__ == f"gateway._fast.{name}_py"
        else:
            assert selector.COMPILED is True, name
            assert selector.implementation.__name__ == f"gateway._fast.{name}_c"
            assert selector.implementation.__file__.endswith(tuple(EXTENSION_SUFFIXES))


def test_breaker_selector_exports_the_loaded_implementation():
    breaker = importlib.import_module("gateway._fast.breaker")
    assert breaker.COMPILED is not NO_EXTENSIONS
    assert breaker.CircuitBreaker is breaker.implementation.CircuitBreaker
    assert (breaker.CLOSED, breaker.OPEN, breaker.HALF_OPEN) == (0, 1, 2)
    assert (breaker.REFUSED, breaker.ADMITTED) == (0, 1)
    assert breaker.STATE_NAMES == ("closed", "open", "half_open")


def test_compiled_source_is_a_relative_symlink_to_the_twin():
    # A copy instead of the link would let the two implementations drift. The
    # source tree is what counts: a wheel stores the link's target as a file.
    fast = pathlib.Path(__file__).resolve().parents[2] / "src" / "gateway" / "_fast"
    for name in ("breaker", "fairness", "intake", "screen", "token_bucket", "violations", "windows"):
        assert os.readlink(fast / f"{name}_c.py") == f"{name}_py.py"


def test_unbuilt_extension_is_an_import_error(tmp_path):
    # A source-only copy of the package: `token_bucket_c` then imports from
    # its `.py` symlink, which the selector must refuse.
    fast = tmp_path / "gateway" / "_fast"
    fast.mkdir(parents=True)
    (tmp_path / "gateway" / "__init__.py").write_text("")
    for name in ("__init__.py", "token_bucket.py", "token_bucket_py.py"):
        shutil.copy(FAST_DIR / name, fast / name)
    (fast / "token_bucket_c.py").symlink_to("token_bucket_py.py")
    code = "import gateway._fast.token_bucket as s; print(s.COMPILED)"

    result = _run_python(code, PYTHONPATH=str(tmp_path), GATEWAY_NO_EXTENSIONS="0")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "GATEWAY_NO_EXTENSIONS=1" in result.stderr

    result = _run_python(code, PYTHONPATH=str(tmp_path), GATEWAY_NO_EXTENSIONS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
