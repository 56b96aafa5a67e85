"""A small harness for the benchmarks in bench/: interleaved variants, medians, ratios, JSON, plots.

Reused by every bench script (the store benches and the per-request adapter benches):

    from _harness import Metric, Report, Variant      # bench/ is on sys.path when run as a script

    report = Report("asgi_overhead", argv=sys.argv)
    report.run(
        "allowed",                                    # table id: file names and JSON key
        title="ASGI overhead per request, limit never reached",
        variants=[Variant("bare", bare), Variant("ours", ours), Variant("slowapi", slow)],
        metrics=[Metric("us", "us/request", lower_is_better=True)],
        baseline="bare",                             # ratios are against this variant's medians
        reps=7,
        params={"requests": 20_000},
        plot=["us"],                                  # metrics to plot (PNG in docs/img/)
    )
    report.save()                                     # bench/results/asgi_overhead.json (+ .md)

A variant is a callable `fn(rep) -> {metric: number, ...}` (extra keys are kept as details); it
may be a coroutine function, run on the report's own event loop. Repetition `r` runs every variant
once, in an order rotated by `r` (A B C, B C A, C A B, ...): variants are interleaved, never run
as A A A B B B, so that drift on a shared, noisy machine hits all of them alike. Optionally each
variant runs once unrecorded first (`warmup=True`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
IMG_DIR = ROOT / "docs" / "img"


# -- small statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def latency_summary(ns: Sequence[int], prefix: str = "") -> dict[str, float]:
    """p50/p90/p99/mean in microseconds of a list of nanosecond durations."""
    us = [v / 1000.0 for v in ns]
    return {
        f"{prefix}p50_us": percentile(us, 50),
        f"{prefix}p90_us": percentile(us, 90),
        f"{prefix}p99_us": percentile(us, 99),
        f"{prefix}mean_us": statistics.fmean(us) if us else math.nan,
    }


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    """Mean microseconds of `calls` back-to-back calls of a synchronous `fn` (tight loop)."""
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls / 1000.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- machine description ----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _nproc() -> int:
    try:
        out = subprocess.run(["nproc"], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return os.cpu_count() or 0


def package_versions(names: Iterable[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def source_digest(package_dir: Path = ROOT / "ratesync_middleware") -> str:
    """A short sha256 of the package's .py files, to tell which code a result measured."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(str(path.relative_to(package_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(
    packages: Iterable[str] = (), servers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What the figures were measured on (printed, and stored in the JSON)."""
    return {
        "nproc": _nproc(),
        "cpu": _cpu_model(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "packages": package_versions(packages),
        "servers": dict(servers or {}),
        "ratesync_middleware_sha256": source_digest(),
        "loadavg_at_start": list(os.getloadavg()),
    }


# -- variants, metrics, tables ----------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str = ""
    lower_is_better: bool = True
    ratio: bool = True  # print a ratio against the baseline's median
    digits: int | None = None  # None: chosen from the magnitude
    agg: str = "median"  # how repetitions combine in the table: "median", or "max"/"min"/"sum"
    # (a correctness count such as wrong refusals is shown as its worst repetition: "max")

    def fmt(self, value: float | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        digits = self.digits
        if digits is None:
            magnitude = abs(value)
            digits = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
        if value == int(value) and (digits == 0 or self.digits is None):
            return f"{int(value):,}"
        return f"{value:,.{digits}f}"


@dataclass
class Variant:
    name: str
    fn: Callable[[int], Any]  # rep -> mapping of numbers (or an awaitable of one)
    applies: bool = True  # False: shown as "n/a" (e.g. a workload a peer has no equivalent for)


def _ratio(value: float, base: float) -> float | None:
    if base is None or value is None or math.isnan(base) or math.isnan(value) or base == 0:
        return None
    return value / base


@dataclass
class Table:
    id: str
    title: str
    metrics: list[Metric]
    baseline: str | None
    reps: int
    params: dict[str, Any]
    variant_names: list[str]
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    order: list[list[str]] = field(default_factory=list)  # the run order of each repetition
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # medians over repetitions, for every numeric key a variant returned
    def medians(self, variant: str) -> dict[str, float]:
        rows = self.samples.get(variant, [])
        keys: list[str] = []
        for row in rows:
            keys.extend(k for k in row if k not in keys)
        out = {}
        for key in keys:
            values = [row[key] for row in rows if isinstance(row.get(key), int | float)]
            values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            out[key] = statistics.median(values) if values else math.nan
        return out

    def aggregate(self, variant: str, metric: Metric) -> float:
        """The table's figure for one metric: the median, or the worst/total as the metric says."""
        if metric.agg == "median":
            return self.medians(variant).get(metric.key, math.nan)
        values = [
            row[metric.key]
            for row in self.samples.get(variant, [])
            if isinstance(row.get(metric.key), int | float) and not math.isnan(row[metric.key])
        ]
        if not values:
            return math.nan
        return {"max": max, "min": min, "sum": sum}[metric.agg](values)

    def spread(self, variant: str, key: str) -> tuple[float, float]:
        values = [row[key] for row in self.samples.get(variant, []) if key in row]
        return (min(values), max(values)) if values else (math.nan, math.nan)

    def ratios(self, variant: str) -> dict[str, float | None]:
        if self.baseline is None or self.baseline not in self.samples:
            return {}
        base = self.medians(self.baseline)
        mine = self.medians(variant)
        return {
            m.key: _ratio(mine.get(m.key, math.nan), base.get(m.key, math.nan))
            for m in self.metrics
            if m.ratio
        }

    def rows(self) -> list[list[str]]:
        header = ["variant"]
        for metric in self.metrics:
            header.append(
                metric.label
                + (f" ({metric.unit})" if metric.unit else "")
                + ("" if metric.agg == "median" else f", {metric.agg} of reps")
            )
            if metric.ratio and self.baseline:
                header.append("ratio")
        body = [header]
        for name in self.variant_names:
            if name not in self.samples:
                body.append([name] + ["n/a"] * (len(header) - 1))
                continue
            medians = self.medians(name)
            ratios = self.ratios(name)
            row = [name + (" (baseline)" if name == self.baseline else "")]
            for metric in self.metrics:
                row.append(
                    metric.fmt(
                        self.aggregate(name, metric)
                        if metric.agg != "median"
                        else medians.get(metric.key)
                    )
                )
                if metric.ratio and self.baseline:
                    r = ratios.get(metric.key)
                    row.append("-" if r is None else f"{r:.2f}x")
            body.append(row)
        return body

    def text(self) -> str:
        rows = self.rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"== {self.title} ({self.reps} reps, medians) =="]
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def markdown(self) -> str:
        rows = self.rows()
        out = [
            "| " + " | ".join(rows[0]) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|",
        ]
        out.extend("| " + " | ".join(row) + " |" for row in rows[1:])
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "baseline": self.baseline,
            "reps": self.reps,
            "params": self.params,
            "metrics": [m.__dict__ for m in self.metrics],
            "order": self.order,
            "medians": {name: self.medians(name) for name in self.samples},
            "ratios": {name: self.ratios(name) for name in self.samples},
            "table_values": {
                name: {m.key: self.aggregate(name, m) for m in self.metrics}
                for name in self.samples
            },
            "samples": self.samples,
            "plots": self.plots,
            "notes": self.notes,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class Report:
    """The tables of one bench script: run them, print them, save JSON, markdown and PNG plots."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str] | None = None,
        packages: Iterable[str] = (),
        servers: Mapping[str, str] | None = None,
        img_dir: Path = IMG_DIR,
        results_dir: Path = RESULTS_DIR,
    ) -> None:
        self.name = name
        argv = list(sys.argv if argv is None else argv)
        script = Path(argv[0]).resolve() if argv else Path("?")
        try:
            script_text = str(script.relative_to(ROOT))
        except ValueError:
            script_text = str(script)
        self.command = " ".join([".venv/bin/python", script_text, *argv[1:]])
        self.machine = machine_info(packages, servers)
        self.tables: list[Table] = []
        self.extra: dict[str, Any] = {}
        self.img_dir = img_dir
        self.results_dir = results_dir
        self.started = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None

    def set_servers(self, servers: Mapping[str, str]) -> None:
        self.machine["servers"] = dict(servers)

    def header(self) -> str:
        m = self.machine
        servers = ", ".join(f"{k} {v}" for k, v in m["servers"].items())
        pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        return (
            f"# {self.name}: {self.command}\n"
            f"# machine: nproc={m['nproc']}, {m['cpu']}, {m['memory_gib']} GiB, {m['os']}\n"
            f"# python {m['python']}; {pkgs}; package source sha256 {m['ratesync_middleware_sha256']}"
            + (f"\n# servers: {servers}" if servers else "")
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def _call(self, variant: Variant, rep: int) -> dict[str, float]:
        result = variant.fn(rep)
        if inspect.isawaitable(result):
            result = self.loop.run_until_complete(result)
        return dict(result or {})

    def run(
        self,
        table_id: str,
        *,
        title: str,
        variants: Sequence[Variant],
        metrics: Sequence[Metric],
        baseline: str | None = None,
        reps: int = 5,
        params: Mapping[str, Any] | None = None,
        plot: Sequence[str] = (),
        targets: Mapping[str, tuple[float, str]] | None = None,
        warmup: bool = False,
        rotate: bool = True,
        verbose: bool = True,
    ) -> Table:
        """Run `reps` interleaved repetitions of the variants; print and keep the table."""
        table = Table(
            id=table_id,
            title=title,
            metrics=list(metrics),
            baseline=baseline,
            reps=reps,
            params=dict(params or {}),
            variant_names=[v.name for v in variants],
        )
        active = [v for v in variants if v.applies]
        if warmup:
            for variant in active:
                self._call(variant, -1)
        for rep in range(reps):
            shift = rep % len(active) if rotate and active else 0
            ordered = active[shift:] + active[:shift]
            table.order.append([v.name for v in ordered])
            for variant in ordered:
                sample = self._call(variant, rep)
                table.samples.setdefault(variant.name, []).append(sample)
                if verbose:
                    shown = ", ".join(
                        f"{m.key}={m.fmt(sample.get(m.key))}" for m in metrics if m.key in sample
                    )
                    print(
                        f"  [{table_id} rep {rep + 1}/{reps}] {variant.name}: {shown}", flush=True
                    )
        self.tables.append(table)
        if plot:
            table.plots.append(self.plot(table, plot, targets or {}))
        print(table.text(), flush=True)
        return table

    def plot(
        self,
        table: Table,
        metric_keys: Sequence[str],
        targets: Mapping[str, tuple[float, str]] | None = None,
    ) -> str:
        """Bars of the medians (whiskers: min..max over repetitions), one panel per metric;
        `targets` draws a dashed line per metric (value, label), e.g. an issue's target."""
        import textwrap

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        targets = targets or {}
        metrics = [m for m in table.metrics if m.key in metric_keys]
        names = [n for n in table.variant_names if n in table.samples]
        width = max(6.5, 1.3 * len(names)) * len(metrics)
        fig, axes = plt.subplots(1, len(metrics), figsize=(width, 4.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            medians = [table.medians(n).get(metric.key, math.nan) for n in names]
            lows, highs = zip(*(table.spread(n, metric.key) for n in names), strict=True)
            err = [
                [
                    max(0.0, m - lo) if not math.isnan(m) else 0
                    for m, lo in zip(medians, lows, strict=True)
                ],
                [
                    max(0.0, hi - m) if not math.isnan(m) else 0
                    for m, hi in zip(medians, highs, strict=True)
                ],
            ]
            colors = ["#4c72b0" if n != table.baseline else "#888888" for n in names]
            bars = ax.bar(range(len(names)), medians, yerr=err, capsize=4, color=colors)
            for bar, value in zip(bars, medians, strict=True):
                if not math.isnan(value):
                    ax.annotate(
                        metric.fmt(value),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                        xytext=(0, 2),
                        textcoords="offset points",
                    )
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(
                [n.replace(" ", "\n", 1) if len(n) > 12 else n for n in names], fontsize=8
            )
            better = "lower is better" if metric.lower_is_better else "higher is better"
            ax.set_ylabel(f"{metric.label} ({metric.unit})" if metric.unit else metric.label)
            ax.set_title(f"{metric.label}: {better}", fontsize=9)
            if metric.key in targets:
                value, label = targets[metric.key]
                ax.axhline(value, color="#c44e52", linestyle="--", linewidth=1)
                ax.annotate(
                    label,
                    (ax.get_xlim()[0], value),
                    color="#c44e52",
                    fontsize=8,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            ax.grid(axis="y", alpha=0.3)
        title = textwrap.fill(table.title, width=int(width * 13))
        fig.suptitle(
            f"{title}\nmedian of {table.reps} interleaved reps, whiskers min..max", fontsize=9
        )
        fig.tight_layout()
        self.img_dir.mkdir(parents=True, exist_ok=True)
        path = self.img_dir / f"{self.name}-{table.id}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        try:
            return str(path.relative_to(ROOT))
        except ValueError:
            return str(path)

    def markdown(self) -> str:
        parts = [f"Command: `{self.command}`", ""]
        for table in self.tables:
            parts += [
                f"#### {table.title}",
                "",
                f"{table.reps} interleaved repetitions, medians; params: "
                + ", ".join(f"{k}={v}" for k, v in table.params.items()),
                "",
                table.markdown(),
                "",
            ]
            parts += [f"- {note}" for note in table.notes]
            if table.notes:
                parts.append("")
            parts += [
                f"![{table.title}]({Path(p).relative_to('docs') if p.startswith('docs/') else p})"
                for p in table.plots
            ]
            parts.append("")
        return "\n".join(parts)

    def save(self) -> Path:
        self.machine["loadavg_at_end"] = list(os.getloadavg())
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{self.name}.json"
        data = {
            "name": self.name,
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "machine": self.machine,
            "tables": [t.to_json() for t in self.tables],
            **self.extra,
        }
        path.write_text(json.dumps(_jsonable(data), indent=1) + "\n")
        (self.results_dir / f"{self.name}.md").write_text(self.markdown())
        print(f"wrote {path.relative_to(ROOT)} and {self.name}.md; plots in docs/img/", flush=True)
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        return path
