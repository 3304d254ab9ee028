"""`python -m benchmarks run|list`: run registered benchmarks, print tables or one JSON object.

    python -m benchmarks run [--quick] [--out DIR] [--json] [--only NAME[,NAME...]]
                             [--seconds S] [--rounds N] [--profile]

Progress (one line per step, with an ETA) goes to stderr; stdout carries the tables, or with
--json exactly one JSON object keyed by benchmark name.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from benchmarks import report as report_mod
from benchmarks.framework import (
    MODULES,
    REGISTRY,
    BenchmarkError,
    Context,
    Progress,
    Report,
    RunOptions,
)


def load_benchmarks() -> None:
    for module in MODULES:
        importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run benchmarks (all, or those named by --only)")
    run.add_argument("--quick", action="store_true", help="short runs (the suite in < 3 min)")
    run.add_argument("--out", type=Path, help="write results.json, results.md and plots here")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    run.add_argument("--only", help="comma-separated benchmark names")
    run.add_argument("--seconds", type=float, help="override each measurement's duration")
    run.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    run.add_argument(
        "--profile", action="store_true", help="also record perf profiles into --out (fastpath)"
    )
    sub.add_parser("list", help="list the benchmarks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_benchmarks()
    if args.command == "list":
        for name, bench in REGISTRY.items():
            print(f"{name:12} {bench.summary}")
        return 0
    names = list(REGISTRY)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}; see `list`", file=sys.stderr)
            return 2
    if args.seconds is not None and args.seconds <= 0:
        print("--seconds must be positive", file=sys.stderr)
        return 2
    if args.rounds is not None and args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    if args.profile and args.out is None:
        print("--profile needs --out", file=sys.stderr)
        return 2
    options = RunOptions(args.quick, args.seconds, args.rounds, args.out, args.profile)
    progress = Progress()
    for name in names:
        progress.add(name, REGISTRY[name].plan(options))
    reports: list[Report] = []
    errors: dict[str, str] = {}
    for name in names:
        try:
            reports.append(REGISTRY[name].run(Context(name, options, progress)))
        except BenchmarkError as exc:
            errors[name] = str(exc)
            progress.note(name, f"FAILED: {exc}")
    if args.json:
        print(json.dumps(report_mod.json_document(reports, errors), indent=2))
    else:
        for r in reports:
            print(report_mod.human(r))
            print()
        for name, err in errors.items():
            print(f"== {name}: FAILED\n{err}\n")
    if args.out is not None:
        paths, note = report_mod.write_outputs(args.out, reports, errors)
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)
        if note:
            print(note, file=sys.stderr)
    return 1 if errors else 0
