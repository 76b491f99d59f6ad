"""The fast stub MCP upstream, kept under its old name: it lives in loadtests/stub_upstream.py.

    python bench/stub_upstream.py --port 9100 [--host 127.0.0.1]

bench/proxy.py and the load tests use the same stub (answers in both eras, one fixed
result per call; see that module's docstring).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtests"))

from stub_upstream import StubProtocol, answer_body, main, serve  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
