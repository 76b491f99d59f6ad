"""Per-server call windows (gateway._fast.windows): the counts and latency sample behind server_metrics rows,
the same from both twins for the same calls and the same random draws."""

from __future__ import annotations

import random
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st


def test_a_busy_windows_latency_sample_is_bounded_and_uniform(windows_impl):
    """Past `SAMPLES` calls the window keeps a reservoir (Algorithm L): `SAMPLES` latencies, every call equally
    likely to be one of them, whatever its place in the window."""
    samples = windows_impl.SAMPLES
    state = random.getstate()
    random.seed(20261126)
    try:
        calls, runs, tenths = 20_000, 60, [0] * 10
        for _ in range(runs):
            window = windows_impl.Window(None)
            for i in range(calls):
                window.add(i % 7 != 0, float(i))
            assert len(window.samples) == samples
            assert (window.calls, window.errors) == (calls, len(range(0, calls, 7)))
            assert window.total == sum(map(float, range(calls)))
            assert len(set(window.samples)) == samples  # each call kept at most once
            for value in window.samples:
                tenths[int(value * 10 // calls)] += 1
    finally:
        random.setstate(state)
    kept = runs * samples
    # Each tenth of the window holds a tenth of the sample: 12,288 expected, a standard deviation of ~105.
    assert all(abs(count - kept / 10) < 600 for count in tenths), tenths


def test_a_quiet_windows_sample_is_every_call(windows_impl):
    window = windows_impl.Window(None)
    for i in range(100):
        window.add(True, i / 1000)
    assert window.samples == [i / 1000 for i in range(100)]
    assert (window.calls, window.errors, window.tenant_id) == (100, 0, None)


def _state(by_server):
    return {server: {tool: (w.tenant_id, w.calls, w.errors, w.total, list(w.samples)) for tool, w in tools.items()}
            for server, tools in by_server.items()}


@settings(max_examples=60, deadline=None)
@given(calls=st.lists(st.tuples(st.integers(0, 2), st.sampled_from([None, "echo", "add"]), st.booleans(),
                                st.floats(0, 30, allow_nan=False)), max_size=300),
       seed=st.integers(0, 2**32 - 1), repeat=st.integers(1, 12))
def test_the_twins_keep_the_same_windows(compiled_windows, python_windows, calls, seed, repeat):
    """The same calls (servers as id objects, equal ones among them, tools, outcomes, latencies) with the same
    random draws give the same windows from both twins, past the reservoir's start too; `take` hands them over
    and starts afresh."""
    tenant = uuid.uuid4()
    servers = [uuid.UUID(int=7), uuid.UUID(int=7), uuid.UUID(int=9)]  # two equal, distinct objects

    def run(module):
        random.seed(seed)
        windows = module.CallWindows()
        taken = []
        for round_ in range(2):
            for _ in range(repeat):
                for server, tool, ok, seconds in calls:
                    windows.observe(tenant if server else None, servers[server], tool, ok, seconds)
            for _ in range(module.SAMPLES if round_ == 0 and calls else 0):  # into the reservoir
                windows.observe(tenant, servers[2], None, True, 0.5)
            taken.append(_state(windows.take()))
        return taken, _state(windows.take()), random.random()

    state = random.getstate()
    try:
        ours, theirs = run(compiled_windows), run(python_windows)
    finally:
        random.setstate(state)
    assert ours == theirs
    assert ours[1] == {}
    first = ours[0][0]
    for at in {0, 1} & {server for server, *_ in calls}:  # equal server ids share their windows
        assert first[servers[at]][None][1] == repeat * sum(1 for s, *_ in calls if s in (0, 1))
