"""What every benchmark shares: the registry, run options, progress with ETA, and A/B statistics.

A benchmark is a module under `benchmarks/` with a `Benchmark` subclass decorated `@register`;
`benchmarks.cli` imports the modules listed in `MODULES` and runs the selected ones in order.
Timing claims are ratios against peers measured in the same run, interleaved A B A B.
"""

from __future__ import annotations

import abc
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

__all__ = [
    "MODULES",
    "REGISTRY",
    "Benchmark",
    "BenchmarkError",
    "Context",
    "Plan",
    "Progress",
    "Report",
    "RunOptions",
    "Stats",
    "interleave",
    "ratio",
    "register",
    "stats_by_key",
]

#: Modules that define benchmarks, in the order `run` executes them.
MODULES = (
    "benchmarks.fastpath",
    "benchmarks.memory",
    "benchmarks.new_flows",
    "benchmarks.recovery",
    "benchmarks.latency",
    "benchmarks.fallback",
)


class BenchmarkError(RuntimeError):
    """A benchmark could not measure (missing tool, set-up failure); the message says why."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How the user asked to run (`python -m benchmarks run ...`)."""

    quick: bool = False
    """Shorter measurements and fewer rounds (the whole suite in < 3 minutes)."""
    seconds: float | None = None
    """Override of each measurement's duration (the smoke test uses tiny ones)."""
    rounds: int | None = None
    """Override of the number of interleaved rounds."""
    out: Path | None = None
    """Where JSON, Markdown and plots go (None: nowhere)."""
    profile: bool = False
    """Also record CPU profiles (`perf`) where a benchmark supports it, into `out`."""

    def pick_seconds(self, quick: float, full: float) -> float:
        return self.seconds if self.seconds is not None else quick if self.quick else full

    def pick_rounds(self, quick: int, full: int) -> int:
        return self.rounds if self.rounds is not None else quick if self.quick else full


@dataclass(frozen=True, slots=True)
class Plan:
    """A benchmark's expected amount of work, for the progress ETA."""

    steps: int
    seconds: float


@dataclass
class Report:
    """What a benchmark hands back: JSON data, a human table, notes and optional plots."""

    name: str
    data: dict[str, Any]
    """JSON-ready; printed under the benchmark's name by `--json`."""
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    plot: Callable[[Any, Path], list[Path]] | None = None
    """`plot(pyplot, out_dir)` draws PNGs and returns their paths (only if matplotlib exists)."""


class Progress:
    """One line per finished step on stderr: step count, what was done, elapsed time and ETA.

    The ETA scales the remaining planned seconds by how fast the steps done so far went
    compared with their plan, so it corrects itself on a slower or faster machine.
    """

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._start = time.monotonic()
        self._plans: dict[str, Plan] = {}
        self._done: dict[str, int] = {}

    def add(self, name: str, plan: Plan) -> None:
        self._plans[name] = plan
        self._done[name] = 0

    def _planned_done(self) -> float:
        return sum(
            self._plans[n].seconds * min(d, self._plans[n].steps) / max(1, self._plans[n].steps)
            for n, d in self._done.items()
        )

    def eta(self) -> float:
        total = sum(p.seconds for p in self._plans.values())
        done = self._planned_done()
        elapsed = time.monotonic() - self._start
        # Trust the observed speed only as the run progresses (first steps are set-up).
        weight = min(1.0, 4 * done / total) if total > 0 else 1.0
        observed = elapsed / done if done > 0 else 1.0
        return max(0.0, (total - done) * ((1 - weight) + weight * observed))

    def step(self, name: str, message: str) -> None:
        self._done[name] = self._done.get(name, 0) + 1
        steps = sum(p.steps for p in self._plans.values())
        done = sum(self._done.values())
        elapsed = time.monotonic() - self._start
        self._stream.write(
            f"[{done:>3}/{steps}] {name}: {message}  "
            f"(elapsed {_clock(elapsed)}, ETA {_clock(self.eta())})\n"
        )
        self._stream.flush()

    def note(self, name: str, message: str) -> None:
        """A line that is not a step (set-up news, warnings)."""
        self._stream.write(f"        {name}: {message}\n")
        self._stream.flush()


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60}:{s % 60:02d}"


@dataclass
class Context:
    """Handed to `Benchmark.run`: the options and a progress reporter bound to the benchmark."""

    name: str
    options: RunOptions
    progress: Progress

    def step(self, message: str) -> None:
        self.progress.step(self.name, message)

    def note(self, message: str) -> None:
        self.progress.note(self.name, message)


class Benchmark(abc.ABC):
    """One benchmark; subclasses set `name` and `summary` and are decorated with `@register`."""

    name: str = ""
    summary: str = ""

    @abc.abstractmethod
    def plan(self, options: RunOptions) -> Plan:
        """How many `ctx.step` calls `run` will make and how long it should take."""

    @abc.abstractmethod
    def run(self, ctx: Context) -> Report:
        """Measure; raise BenchmarkError when it cannot."""


#: Registered benchmarks by name, in registration order.
REGISTRY: dict[str, Benchmark] = {}

_B = TypeVar("_B", bound=type[Benchmark])


def register(cls: _B) -> _B:
    """Class decorator: add one instance of `cls` to `REGISTRY` under `cls.name`."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"benchmark name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls()
    return cls


# ---- A/B statistics ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    """Median, minimum and maximum of one metric over rounds, with the raw samples."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    def to_json(self, digits: int = 1) -> dict[str, Any]:
        return {
            "median": round(self.median, digits),
            "min": round(self.min, digits),
            "max": round(self.max, digits),
            "samples": [round(s, digits) for s in self.samples],
        }


def ratio(a: Stats, b: Stats) -> float:
    """median(a) / median(b), 0.0 when b's median is 0."""
    return a.median / b.median if b.median else 0.0


_P = TypeVar("_P")
_R = TypeVar("_R")


def interleave(
    peers: Sequence[_P],
    rounds: int,
    measure: Callable[[_P, int], _R],
    name: Callable[[_P], str] = str,
) -> dict[str, list[_R]]:
    """Measure every peer once per round, in the same order each round (A B C A B C ...), so
    that drifts of a shared, noisy machine hit every peer alike.

    `measure(peer, round)` returns that round's result; the result maps each peer's name to
    its results in round order (see `stats_by_key` to summarise them).
    """
    results: dict[str, list[_R]] = {}
    for rnd in range(rounds):
        for peer in peers:
            results.setdefault(name(peer), []).append(measure(peer, rnd))
    return results


def stats_by_key(results: Sequence[Mapping[str, float]]) -> dict[str, Stats]:
    """Stats of each metric over rounds, from `interleave` results that are metric dicts."""
    keys = {k for r in results for k in r}
    return {k: Stats.of([r[k] for r in results if k in r]) for k in sorted(keys)}
