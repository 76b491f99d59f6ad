"""In-process counters and the Prometheus text rendering of `/metrics`.

Counting costs one dict update on the request path; rendering happens only
when `/metrics` is scraped. Labels are fixed small sets (server, method class,
outcome), never user input of unbounded variety such as tool arguments.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable

# Latency buckets in seconds (Prometheus `le` bounds).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)) + "}"


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, *labels, amount: float = 1.0) -> None:
        self.values[labels] += amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {value:g}"


class Histogram:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
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
        for labels, series in sorted(self.series.items()):
            cumulative = 0.0
            base = _labels(self.label_names, labels)[1:-1]
            sep = "," if base else ""
            for bound, count in zip(BUCKETS, series):
                cumulative += count
                yield f'{self.name}_bucket{{{base}{sep}le="{bound:g}"}} {cumulative:g}'
            yield f'{self.name}_bucket{{{base}{sep}le="+Inf"}} {series[-2]:g}'
            yield f"{self.name}_count{_labels(self.label_names, labels)} {series[-2]:g}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {series[-1]:.6f}"


class Gauge:
    """A value read at scrape time from a callback."""

    def __init__(self, name: str, help_text: str, read: Callable[[], Iterable[tuple[tuple, float]]],
                 labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.read, self.label_names = name, help_text, read, labels

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in self.read():
            yield f"{self.name}{_labels(self.label_names, labels)} {value:g}"


class Registry:
    def __init__(self) -> None:
        self.metrics: list = []

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
        metric = Counter(name, help_text, labels)
        self.metrics.append(metric)
        return metric

    def histogram(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Histogram:
        metric = Histogram(name, help_text, labels)
        self.metrics.append(metric)
        return metric

    def gauge(self, name: str, help_text: str, read, labels: tuple[str, ...] = ()) -> Gauge:
        metric = Gauge(name, help_text, read, labels)
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
