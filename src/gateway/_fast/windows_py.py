"""Each upstream server's calls in one period, per tool: counts, errors, latencies (what records/server_stats.py
turns into server_metrics rows at the end of the period).

`CallWindows.observe` runs once per upstream call on the request path (the
guard reports every call it let through), so it is kept here, in the compiled
core: a server's windows are found by the identity of its id (the last
server's kept at hand, the others by the id object's address: hashing one of
asyncpg's UUIDs runs about 500 instructions, and calls to two servers in turn
missed the last one every time), a tool's by its name, and a window adds a
call in a few float operations. `take` hands the period's windows over and starts afresh.

A window keeps a uniform sample of at most `SAMPLES` latencies, from which the
percentiles come: past `SAMPLES` calls it is a reservoir kept by Li's
"Algorithm L" (ACM TOMS 20(4), 1994). Instead of drawing a random number for
every call, it draws how many calls to skip before the next one that replaces a
kept latency, so that every call is equally likely to be in the sample and a
call costs a comparison between replacements. The draws are Python's `random`
module's, in the same order in both twins.

This file is also the compiled module: `windows_c.py` is a symlink to it and
`windows_c.pxd` gives it C types, so keep it to float arithmetic, lists and
dicts.
"""

import random
# exp, floor, log and log1p: Python's here; in the compiled module windows_c.pxd cimports the C library's under
# those names, which an import naming them would rebind (Cython refuses that), and a star import does not.
from math import *  # noqa: F403

SAMPLES = 2048
_KEEP = SAMPLES  # a C integer in the compiled module


_random = random.random  # the module's shared generator (random.seed reaches it), without a lookup per draw


def _uniform():
    """A uniform draw in (0, 1): never 0, whose logarithm Algorithm L takes."""
    return 1.0 - _random()


class Window:
    """One row's period: counts, the sum of latencies in seconds, and a uniform sample of at most `SAMPLES`."""

    def __init__(self, tenant_id):
        self.tenant_id = tenant_id
        self.calls = 0
        self.errors = 0
        self.total = 0.0  # seconds
        self.samples = []
        self._next = 0  # past the first SAMPLES calls: the number of the next call whose latency is kept
        self._w = 1.0  # Algorithm L's running weight

    def add(self, ok, seconds):
        calls = self.calls + 1
        self.calls = calls
        if not ok:
            self.errors += 1
        self.total += seconds
        if calls <= _KEEP:
            self.samples.append(seconds)
            if calls == _KEEP:
                self._w = exp(log(_uniform()) / _KEEP)  # noqa: F405
                self._next = calls
                self._skip()
        elif calls == self._next:
            self.samples[min(int(_uniform() * _KEEP), _KEEP - 1)] = seconds
            self._w *= exp(log(_uniform()) / _KEEP)  # noqa: F405
            self._skip()

    def _skip(self):
        """Move `_next` past a geometric number of calls (Algorithm L's step)."""
        w = self._w
        if w < 1.0:
            self._next += int(floor(log(_uniform()) / log1p(-w))) + 1  # noqa: F405
        else:
            self._next += 1


class CallWindows:
    """The period's windows: for each server id, a dict of its windows by tool (None: every call of the server)."""

    def __init__(self):
        self._windows = {}
        self._last_server = None  # the server of the last call, and its dict
        self._last = None
        # The id object's address -> (that id, its dict). Each entry holds its id alive, so no other object takes
        # the address while it is here; a new snapshot's equal id finds the same dict through `_windows`.
        self._by_address = {}

    def observe(self, tenant_id, server_id, tool, ok, seconds):
        """One upstream call ended with an answer (`ok`) or a failure, after `seconds`."""
        windows = self._last
        if server_id is not self._last_server or windows is None:
            address = id(server_id)
            known = self._by_address.get(address)
            if known is not None and known[0] is server_id:
                windows = known[1]
            else:
                windows = self._windows.get(server_id)
                if windows is None:
                    windows = {None: Window(tenant_id)}
                    self._windows[server_id] = windows
                self._by_address[address] = (server_id, windows)
            self._last_server = server_id
            self._last = windows
        window = windows[None]
        window.add(ok, seconds)
        if tool is not None:
            window = windows.get(tool)
            if window is None:
                window = Window(tenant_id)
                windows[tool] = window
            window.add(ok, seconds)

    def take(self):
        """The period's windows, by server id and tool; the next period starts empty."""
        windows = self._windows
        self._windows = {}
        self._by_address = {}
        self._last_server = None
        self._last = None
        return windows


__all__ = ("SAMPLES", "CallWindows", "Window")
