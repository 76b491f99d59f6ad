"""Reading callgrind's dumps: what the benchmarks that count instructions need beyond the summary line."""

from __future__ import annotations

from pathlib import Path


def in_object(dump: Path, needle: str) -> int:
    """The instructions a callgrind dump counts in the code of object files whose path holds `needle`
    (each function's own cost, not what it calls)."""
    names: dict[str, str] = {}
    current = ""
    total = 0
    after_call = False
    with open(dump, errors="replace") as fh:
        for line in fh:
            if line.startswith(("ob=", "cob=")):
                key, _, rest = line.rstrip("\n").partition("=")
                ident, _, name = rest.partition(" ")
                if name:
                    names[ident] = name
                if key == "ob":
                    current = names.get(ident, ident)
            elif line.startswith("calls="):
                after_call = True  # the next cost line is the call's inclusive cost
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                elif needle in current:
                    total += int(line.split()[1])
    return total
