"""A PNG chart of a benchmark's results JSON, written beside it: throughput and latency per target.

    python bench/chart.py bench/results/proxy-20261126T041022Z.json [more.json ...]

Reads what bench/proxy.py and the peer benchmarks (bench/peers/) write: `medians`
(per target: `rps`, `p50_ms`, `p99_ms`, and `rss_peak_mib`/`pss_peak_mib` when
measured), the optional `labels`, and `conditions`. Draws requests/s, p50 and p99
latency (and peak memory when there) per target, with the main conditions underneath, to the same
path with `.png`. matplotlib is a benchmark extra (`pip install -e .[bench]`),
never a dependency of the gateway: `try_write_chart` says so and returns None
when it is missing, and the benchmark's text and JSON output stand alone.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

# Figures that differ this much are drawn on a log scale, or the small bars would vanish.
LOG_SCALE_RATIO = 20.0
# The conditions shown under the chart (when the results have them), in this order.
CONDITION_KEYS = ("cpus", "concurrency", "connections", "payload", "payload_bytes", "load_generator", "duration_s",
                  "load_average_at_start", "load_average_at_end", "gateway_source", "contextforge_install")
DEFAULT_LABELS = {"upstream": "upstream direct", "baseline": "baseline (aiohttp)"}


def try_write_chart(results: Path) -> Path | None:
    """The chart of `results` (a JSON file), or None with a note on stderr when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench: matplotlib is not installed (pip install -e .[bench]); no chart", file=sys.stderr)
        return None
    return write_chart(results)


def write_chart(results: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    data = json.loads(Path(results).read_text())
    medians: dict[str, dict] = data["medians"]
    names = list(medians)
    shown = [label(data, n) for n in names]
    panels = [("throughput", "requests/s", [("req/s", "rps")]),
              ("latency", "ms", [("p50", "p50_ms"), ("p99", "p99_ms")])]
    memory = [(name, key) for name, key in (("RSS", "rss_peak_mib"), ("PSS", "pss_peak_mib"))
              if all(_finite(m.get(key)) for m in medians.values())]
    if memory:
        panels.append(("peak memory of the process tree", "MiB", memory))

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    for ax, (title, unit, series) in zip(axes[0], panels):
        values = [[float(medians[n][key]) for n in names] for _, key in series]
        width = 0.8 / len(series)
        for i, ((name, _), row) in enumerate(zip(series, values)):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(names))]
            bars = ax.bar(xs, row, width, label=name if len(series) > 1 else None)
            ax.bar_label(bars, labels=[_fmt(v) for v in row], fontsize=8, padding=2)
        flat = [v for row in values for v in row if _finite(v) and v > 0]
        if flat and max(flat) / min(flat) > LOG_SCALE_RATIO:
            ax.set_yscale("log")
            unit += ", log scale"
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xticks(range(len(names)), [textwrap.fill(s, 16) for s in shown], fontsize=8)
        ax.margins(y=0.15)
        if len(series) > 1:
            ax.legend(fontsize=8)
    rounds = max((len(r) for r in data.get("runs", {}).values()), default=1)
    fig.suptitle(f"{data.get('benchmark', Path(results).stem)}  {data.get('timestamp', '')}"
                 + (f"  (medians of {rounds} rounds)" if rounds > 1 else ""))
    cond = data.get("conditions", {})
    footer = [f"{k}: {cond[k]}" for k in CONDITION_KEYS if k in cond]
    text = "\n".join(textwrap.shorten(line, 190) for line in footer)
    fig.text(0.01, 0.01, text, fontsize=6.5, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.025 + 0.022 * len(footer), 1, 1))
    out = Path(results).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def label(data: dict, target: str) -> str:
    """How a target is named: the results' own `labels`, else bench/proxy.py's names for its targets."""
    if target in data.get("labels", {}):
        return data["labels"][target]
    if target in DEFAULT_LABELS:
        return DEFAULT_LABELS[target]
    feature = data.get("compare")  # proxy.py: "gateway" has the compared feature on, "gateway-<feature>-off" off
    if feature and target == "gateway":
        return f"gateway ({feature} on)"
    if feature and target == f"gateway-{feature}-off":
        return f"gateway ({feature} off)"
    return target


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: float) -> str:
    if not _finite(value):
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    for path in paths:
        print(write_chart(Path(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
