"""pytest in bench/: benchmarks run in this one process, never in parallel workers.

pyproject.toml's addopts run the test suite in pytest-xdist workers (`-n 4`); under
xdist pytest-benchmark turns itself off (and `--benchmark-only` then refuses to run),
and timings taken next to busy workers would measure the neighbours anyway.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # Before xdist's own tryfirst hook (a conftest registers after the plugin, so runs first):
    # with no workers asked for, xdist sets up no distributed session.
    if hasattr(config.option, "numprocesses"):
        config.option.numprocesses = 0
