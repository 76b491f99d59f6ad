"""bench/proxy_instructions.py's count of the instructions in one object file, read from a real callgrind dump:
the report sets libcrypto's (SHA-256 in software under valgrind) apart from the rest."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")

BENCH = Path(__file__).resolve().parent.parent / "bench"
HASHED = 200_000


def in_object(dump: Path, needle: str) -> int:
    # In a process of its own: the script puts bench/ first on sys.path (its conftest.py among them).
    program = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import proxy_instructions; "
               f"print(proxy_instructions.in_object({str(dump)!r}, {needle!r}))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout)


def test_the_instructions_of_libcrypto_are_told_apart(tmp_path):
    dump = tmp_path / "cg.out"
    program = f"import hashlib; hashlib.sha256(bytes({HASHED})).digest()"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", sys.executable, "-c", program],
                   check=True, capture_output=True, timeout=300)
    total = int(re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.M).group(1))
    hashing = in_object(dump, "libcrypto")
    # SHA-256 in software is tens of instructions a byte; Python's start-up is most of the rest.
    assert 5 * HASHED < hashing < 100 * HASHED
    assert hashing < total
    assert in_object(dump, "no-such-object") == 0
