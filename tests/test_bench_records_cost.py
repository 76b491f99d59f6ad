"""bench/records_cost.py runs: every stage of the records pipeline measured, in the cheap `--tool time` mode
(callgrind takes minutes; the stages and the child protocol are the same)."""

import os
import re
import subprocess
import sys
from pathlib import Path

# tests/conftest.py's server (a plain import of `conftest` may find tests/fast/conftest.py under xdist).
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "records_cost.py"


def test_records_cost_reports_every_stage():
    done = subprocess.run([sys.executable, str(SCRIPT), "--tool", "time", "--rows", "20"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "BENCH_PG_URL": PG_ADMIN_URL})
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("path_request_log", "path_audit", "prepare", "copy_request_logs", "write_audit", "total"):
        assert re.search(rf"^{stage} +\d+\.\d\d$", done.stdout, re.M), (stage, done.stdout)
    assert "us CPU per request; 20 requests' records" in done.stdout
