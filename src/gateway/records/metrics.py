"""In-process counters and the Prometheus text rendering of `/metrics`.

Counting costs one dict update on the request path; rendering happens only
when `/metrics` is scraped. Labels are fixed small sets (tenant, server,
method, outcome), never user input of unbounded variety such as tool
arguments: a JSON-RPC method outside the MCP methods is counted as "other"
(`METHOD_LABELS`), and a tenant is counted by the id the request already holds
and named only when scraped (`tenant_names`), so the request path formats no
string.

Figures another object keeps (the writer's totals, pool sizes) are read when
scraped: `Registry.gauge` for levels, `Registry.counter_from` for totals that
only grow, so Prometheus (and workers.py's merge) treats them as counters.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Latency buckets in seconds (Prometheus `le` bounds).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Namer = Callable[[Any], str]
"""Turns a label value counted as the request path holds it (a tenant's id) into its text."""

# The methods of MCP (2024-11-05 to 2026-07-28) label themselves; a method named by a client
# outside them is "other", so no client can add series. No method (a JSON-RPC response, a body
# that did not parse) is "". GET, POST and DELETE: a request without a message (a stream, the
# end of a session), labelled by its HTTP method.
_MCP_METHODS = (
    "initialize", "ping", "server/discover", "subscriptions/listen",
    "tools/list", "tools/call", "prompts/list", "prompts/get",
    "resources/list", "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "completion/complete", "logging/setLevel", "sampling/createMessage", "elicitation/create", "roots/list",
    "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
    "notifications/initialized", "notifications/cancelled", "notifications/progress", "notifications/message",
    "notifications/roots/list_changed", "notifications/resources/updated", "notifications/resources/list_changed",
    "notifications/tools/list_changed", "notifications/prompts/list_changed", "notifications/elicitation/complete",
    "notifications/tasks/status", "notifications/subscriptions/acknowledged",
)
METHOD_LABELS: dict[str | None, str] = {
    **{method: method for method in _MCP_METHODS},
    "GET": "GET", "POST": "POST", "DELETE": "DELETE",
    None: "",
}
"""method -> its label; anything else is labelled "other" (`METHOD_LABELS.get(method, "other")`)."""


def tenant_names(tenants: Callable[[], Mapping[Any, Any]]) -> Namer:
    """A `Namer` for a tenant counted by id: its name in `tenants()` (the current snapshot's; names
    are unique and never change), its id once it is gone, "" for no tenant (an unauthenticated request)."""

    def name(tenant_id: Any) -> str:
        if tenant_id is None:
            return ""
        tenant = tenants().get(tenant_id)
        return tenant.name if tenant is not None else str(tenant_id)

    return name


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)) + "}"


class _Labelled:
    """A metric whose series are keyed by label values, some of them named at scrape time."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...], names: Mapping[str, Namer] | None) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        unknown = set(names or ()) - set(labels)
        if unknown:
            raise ValueError(f"{name}: no label named {', '.join(sorted(unknown))}")
        # One namer (or str) per label position; None when every value is shown as it is.
        self._namers: tuple[Namer, ...] | None = (
            tuple(names.get(label, str) for label in labels) if names else None
        )

    def _shown(self, labels: tuple) -> tuple[str, ...]:
        if self._namers is None:
            return tuple(str(value) for value in labels)
        return tuple(namer(value) for namer, value in zip(self._namers, labels))


class Counter(_Labelled):
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 names: Mapping[str, Namer] | None = None) -> None:
        super().__init__(name, help_text, labels, names)
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, *labels, amount: float = 1.0) -> None:
        self.values[labels] += amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        shown: dict[tuple[str, ...], float] = {}
        for labels, value in list(self.values.items()):
            key = self._shown(labels)
            shown[key] = shown.get(key, 0.0) + value  # two values may be shown alike (a tenant's id and name)
        for labels, value in sorted(shown.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {value:g}"


class Histogram(_Labelled):
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 names: Mapping[str, Namer] | None = None) -> None:
        super().__init__(name, help_text, labels, names)
        self.series: dict[tuple, list[float]] = {}

    def observe(self, value: float, *labels) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(BUCKETS) + 2)  # buckets, count, sum
        index = bisect_left(BUCKETS, value)
        if index < len(BUCKETS):
            series[index] += 1
        series[-2] += 1
        series[-1] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        shown: dict[tuple[str, ...], list[float]] = {}
        for labels, series in list(self.series.items()):
            key = self._shown(labels)
            into = shown.get(key)
            if into is None:
                shown[key] = list(series)
            else:
                for i, count in enumerate(series):
                    into[i] += count
        for labels, series in sorted(shown.items()):
            cumulative = 0.0
            base = _labels(self.label_names, labels)[1:-1]
            sep = "," if base else ""
            for bound, count in zip(BUCKETS, series):
                cumulative += count
                yield f'{self.name}_bucket{{{base}{sep}le="{bound:g}"}} {cumulative:g}'
            yield f'{self.name}_bucket{{{base}{sep}le="+Inf"}} {series[-2]:g}'
            yield f"{self.name}_count{_labels(self.label_names, labels)} {series[-2]:g}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {series[-1]:.6f}"


class Reading:
    """Values read at scrape time from a callback: a gauge, or a counter kept by another object."""

    def __init__(self, name: str, help_text: str, read: Callable[[], Iterable[tuple[tuple, float]]],
                 labels: tuple[str, ...] = (), kind: str = "gauge") -> None:
        self.name, self.help, self.read, self.label_names, self.kind = name, help_text, read, labels, kind

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.read():
            yield f"{self.name}{_labels(self.label_names, labels)} {value:g}"



class Registry:
    def __init__(self) -> None:
        self.metrics: list = []

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                names: Mapping[str, Namer] | None = None) -> Counter:
        """A counter incremented here. `names`: label -> how its counted values are shown (`tenant_names`)."""
        return self.add(Counter(name, help_text, labels, names))

    def histogram(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                  names: Mapping[str, Namer] | None = None) -> Histogram:
        return self.add(Histogram(name, help_text, labels, names))

    def gauge(self, name: str, help_text: str, read, labels: tuple[str, ...] = ()) -> Reading:
        """A level read at scrape time: `read()` gives (label values, value) pairs."""
        return self.add(Reading(name, help_text, read, labels))

    def counter_from(self, name: str, help_text: str, read, labels: tuple[str, ...] = ()) -> Reading:
        """A total that only grows, kept by another object and read at scrape time like a gauge."""
        return self.add(Reading(name, help_text, read, labels, kind="counter"))

    def add(self, metric):
        """Render `metric` (a Counter or Histogram made elsewhere, e.g. the writer's) with the others."""
        if any(existing.name == metric.name for existing in self.metrics):
            raise ValueError(f"a metric named {metric.name} is registered already")
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
