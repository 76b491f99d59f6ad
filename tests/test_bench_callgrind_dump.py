"""bench/callgrind_dump.py's count of the instructions in one object file, read from a real callgrind dump: the
instruction benchmarks set libcrypto's (SHA-256, in software under valgrind) apart from the rest."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")

# Loaded from its file: bench/ is not put on sys.path (its conftest.py would shadow the tests' own).
_SPEC = importlib.util.spec_from_file_location(
    "callgrind_dump", Path(__file__).resolve().parent.parent / "bench" / "callgrind_dump.py")
callgrind_dump = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(callgrind_dump)

HASHED = 200_000


@pytest.mark.parametrize("compressed", [True, False])
def test_the_instructions_of_libcrypto_are_told_apart(tmp_path, compressed):
    dump = tmp_path / "cg.out"
    program = f"import hashlib; hashlib.sha256(bytes({HASHED})).digest()"
    options = [] if compressed else ["--compress-strings=no"]  # records_cost.py writes names in full
    subprocess.run(["valgrind", "--tool=callgrind", *options, f"--callgrind-out-file={dump}", sys.executable, "-c",
                    program], check=True, capture_output=True, timeout=300)
    total = int(re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.M).group(1))
    hashing = callgrind_dump.in_object(dump, "libcrypto")
    # SHA-256 in software is tens of instructions a byte; Python's start-up is most of the rest.
    assert 5 * HASHED < hashing < 100 * HASHED
    assert hashing < total
    assert callgrind_dump.in_object(dump, "no-such-object") == 0
