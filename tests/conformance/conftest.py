"""Node 22 and the MCP tools it runs, for the conformance and Inspector tests.

scripts/node22.sh installs them from the npm registry into a cache outside git (once;
later runs reuse it). When that is impossible (no registry) the tests that need Node skip
and say why, unless MCP_CONFORMANCE_REQUIRED=1, which CI sets so that a broken install
fails the run instead of hiding the conformance check.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE22_SH = ROOT / "scripts" / "node22.sh"


@dataclass(frozen=True)
class NodeTools:
    node: Path
    modules: Path  # the cache's node_modules

    @property
    def conformance(self) -> Path:
        return self.modules / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"

    @property
    def inspector(self) -> Path:
        return self.modules / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"


@pytest.fixture(scope="session")
def node22() -> NodeTools:
    try:
        done = subprocess.run(
            ["bash", str(NODE22_SH)], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
        )
        problem = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"
    except subprocess.TimeoutExpired:
        problem = "it did not finish within 900 s"
    if problem is not None:
        message = f"Node 22 could not be installed by scripts/node22.sh ({problem})"
        if os.environ.get("MCP_CONFORMANCE_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    node = Path(done.stdout.strip().splitlines()[-1])
    return NodeTools(node=node, modules=node.resolve().parents[2])
