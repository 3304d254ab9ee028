"""`deploy/lab`: build the anycast lab, run the scenario in each mode, print the comparison.

deploy/lab run [--quick] [--json] [--connections N] [--mode M] [--out DIR] [--keep]
deploy/lab run --fault NAME|all [--quick] [--json]   faults (deploy/labkit/faults.py)
deploy/lab up      build the lab and keep it until Ctrl-C (explore it with ip netns exec)
deploy/lab down    remove what a crashed or killed lab left behind
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from deploy.labkit.bird import bird_missing
from deploy.labkit.netns import netns_unavailable, remove_stale_namespaces
from deploy.labkit.scenario import (
    DEFAULT_STEPS,
    MODES,
    ModeRun,
    RouteMonitor,
    ScenarioOptions,
    check_steps,
    run_mode,
)
from deploy.labkit.topology import Lab, LabSize

if TYPE_CHECKING:
    from deploy.labkit.faults import FaultOptions, FaultRun

__all__ = ["main", "run_faults", "run_lab"]

PROG = "deploy/lab"
WORKDIR_PREFIX = "flowstate-lab-"
OWNER_FILE = "owner.pid"
QUICK = {"gap": 2.5, "warmup": 1.0}


class LabInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that everything is torn down."""


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise LabInterrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _teardown_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the stack (so `finally` blocks tear down) like Ctrl-C does."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """No signal interrupts a tear-down half-way (a second Ctrl-C would leave things behind)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def preflight(impl: str) -> str | None:
    """Why the lab cannot run here (with the fix), or None."""
    problem = netns_unavailable() or bird_missing()
    if problem:
        return problem
    for binary in ("redis-server", "redis-cli", "ethtool"):
        if shutil.which(binary) is None:
            return f"{binary} not found: apt-get install redis-server redis-tools ethtool"
    if impl == "c":
        from forwarder.fastpath import c_engine_available

        if not c_engine_available():
            return "the forwarder's C fast path is not built: python3 -m pip install -e ."
    return None


def _workdir() -> Path:
    wd = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    (wd / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return wd


@contextlib.contextmanager
def _lab_session(
    size: LabSize | None,
    log: Callable[[str], None],
    keep_workdir: bool,
    on_built: Callable[[Lab], None] | None,
) -> Iterator[tuple[Lab, RouteMonitor]]:
    """A built lab with its health gate and route monitor; everything torn down on exit."""
    remove_stale_namespaces()
    started = time.monotonic()
    with _teardown_on_signals():
        lab = Lab.build(size or LabSize(), workdir=_workdir(), log=log)
        try:
            if on_built is not None:
                on_built(lab)
            with lab.health_gate():
                monitor = RouteMonitor(lab)
                try:
                    yield lab, monitor
                finally:
                    monitor.close()
        finally:
            with _shielded():
                if keep_workdir:
                    log(f"tearing the lab down (configs and logs kept in {lab.workdir})")
                lab.close(keep_workdir=keep_workdir)
                log(f"lab torn down; {time.monotonic() - started:.0f}s in all")


def run_lab(
    modes: list[str],
    opts: ScenarioOptions,
    *,
    size: LabSize | None = None,
    log: Callable[[str], None] = print,
    keep_workdir: bool = False,
    on_built: Callable[[Lab], None] | None = None,
) -> list[ModeRun]:
    """Build the lab, run `modes` one after another, tear everything down; the runs.

    `on_built` sees the lab once it is up (tests use it to note what must be gone after).
    """
    runs: list[ModeRun] = []
    with _lab_session(size, log, keep_workdir, on_built) as (lab, monitor):
        for mode in modes:
            runs.append(run_mode(lab, mode, opts, monitor, log))
    return runs


def run_faults(
    faults: list[str],
    opts: FaultOptions,
    *,
    size: LabSize | None = None,
    log: Callable[[str], None] = print,
    keep_workdir: bool = False,
    on_built: Callable[[Lab], None] | None = None,
) -> list[FaultRun]:
    """Build the lab, run each fault's scenario (deploy/labkit/faults.py) on it, tear down."""
    from deploy.labkit.faults import CounterSampler, run_fault

    runs: list[FaultRun] = []
    session = _lab_session(size, log, keep_workdir, on_built)
    with session as (lab, monitor), CounterSampler(lab.pops) as sampler:
        for fault in faults:
            runs.append(run_fault(lab, fault, opts, monitor, sampler, log))
    return runs


def _progress_out(args: argparse.Namespace) -> TextIO:
    """Where progress goes: stderr with --json (stdout is then one JSON object)."""
    return sys.stderr if args.json else sys.stdout


def _progress_log(
    args: argparse.Namespace, impl: str, problem: str | None = None
) -> Callable[[str], None] | None:
    """The progress logger of `run`, or None after saying why the arguments (or `problem`
    found in them) or this machine cannot run the lab."""
    if args.connections < 1 or args.udp_flows < 0 or args.interval <= 0:
        problem = "--connections must be >= 1, --udp-flows >= 0, --interval > 0"
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return None
    problem = preflight(impl)
    if problem:
        print(f"{PROG}: cannot run: {problem} (deploy/demo installs everything)", file=sys.stderr)
        return None
    out = _progress_out(args)

    def log(text: str) -> None:
        if text:
            print(text, file=out, flush=True)

    return log


def _cmd_faults(args: argparse.Namespace) -> int:
    from deploy.labkit.faults import FAULTS, FaultOptions, fault_table, summarize_fault, with_quick

    names = list(FAULTS) if args.fault == "all" else [args.fault]
    opts = FaultOptions(
        connections=args.connections,
        late_connections=max(10, args.connections // 5),
        udp_flows=args.udp_flows,
        interval=args.interval,
        impl=args.impl,
    )
    if args.quick:
        opts = with_quick(opts)
    if args.gap is not None:
        opts = dataclasses.replace(opts, gap=args.gap)
    log = _progress_log(args, opts.impl)
    if log is None:
        return 2
    size = LabSize(redis_tls=args.redis_tls)
    runs = run_faults(names, opts, size=size, log=log, keep_workdir=args.keep)
    summaries = {run.fault: summarize_fault(run) for run in runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "faults.json"
    doc = {"options": {**vars(args), "out": str(args.out)}, "faults": summaries}
    path.write_text(json.dumps(doc, indent=1, default=str))
    if args.json:
        print(json.dumps({"faults": summaries}, indent=2))
    else:
        print()
        print(fault_table(summaries))
        print()
    print(f"results: {path}", file=_progress_out(args))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from deploy.labkit.results import comparison_table, plot_timeline, summarize, write_json

    if args.fault is not None:
        return _cmd_faults(args)
    modes = list(MODES) if args.mode == "all" else [args.mode]
    tuning: dict[str, float] = dict(QUICK) if args.quick else {}
    if args.gap is not None:
        tuning["gap"] = args.gap
    opts = ScenarioOptions(
        connections=args.connections,
        udp_flows=args.udp_flows,
        interval=args.interval,
        steps=tuple(args.steps.split(",")) if args.steps else DEFAULT_STEPS,
        impl=args.impl,
        **tuning,
    )
    size = LabSize(redis_tls=args.redis_tls)
    log = _progress_log(args, opts.impl, check_steps(opts.steps, size.pops, size.backends))
    if log is None:
        return 2
    runs = run_lab(modes, opts, size=size, log=log, keep_workdir=args.keep)
    summaries = {run.mode: summarize(run) for run in runs}
    args.out.mkdir(parents=True, exist_ok=True)
    options = {**vars(args), "out": str(args.out), "scenario": opts.__dict__}
    write_json(args.out / "results.json", runs, options)
    png = args.out / "timeline.png"
    drew = plot_timeline(png, runs)
    if args.json:
        print(json.dumps({"modes": summaries}, indent=2))
    else:
        print()
        print(comparison_table(summaries))
        print()
    out = _progress_out(args)
    print(f"results: {args.out / 'results.json'}", file=out)
    print(f"timeline: {png}" if drew else "timeline: not drawn (pip install matplotlib)", file=out)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    problem = preflight("c")
    if problem:
        print(f"{PROG}: cannot run: {problem}", file=sys.stderr)
        return 2
    remove_stale_namespaces()
    with _teardown_on_signals():
        lab = Lab.build(LabSize(), workdir=_workdir())
        try:
            _describe(lab)
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            with _shielded():
                print("tearing the lab down")
                lab.close()
    return 0


def _describe(lab: Lab) -> None:
    print("\nlab is up (no forwarders run yet; `deploy/lab run` drives a scenario). Namespaces:")
    for ns in lab.topo.namespaces:
        print(f"  {ns.role:<7} ip netns exec {ns.name} bash")
    print(f"router BGP:  birdc -s {lab.router_bird.socket} show route")
    print(f"Redis seeds: {','.join(lab.redis_seeds)} (password in {lab.workdir}/redis)")
    print("Ctrl-C tears everything down.")


def _cmd_down(args: argparse.Namespace) -> int:
    """Clean up after labs whose process died (killed, crashed); never touch a live lab."""
    tmp = Path(tempfile.gettempdir())
    removed = remove_stale_namespaces()
    for wd in sorted(tmp.glob(f"{WORKDIR_PREFIX}*")):
        pid = _owner(wd)
        if pid and os.path.exists(f"/proc/{pid}"):
            print(f"lab of live process {pid} left alone ({wd}): Ctrl-C it, or kill -TERM {pid}")
            continue
        shutil.rmtree(wd, ignore_errors=True)
        print(f"removed {wd}")
    print(f"removed {len(removed)} stale namespace(s)")
    return 0


def _owner(workdir: Path) -> int:
    try:
        return int((workdir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The anycast lab: connections through BGP route moves, in three modes.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="build the lab, run the scenario, print the comparison")
    r.add_argument("--quick", action="store_true", help="shorter pauses: all modes in < 2 min")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.add_argument("--connections", type=int, default=200, help="TCP connections (200)")
    r.add_argument("--udp-flows", type=int, default=20, help="UDP flows (20)")
    r.add_argument("--interval", type=float, default=0.05, help="seconds between requests")
    r.add_argument("--mode", choices=[*MODES, "all"], default="all")
    r.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "flowstate-lab")
    r.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    r.add_argument("--impl", choices=["c", "python"], default="c", help="forwarder data path")
    r.add_argument("--gap", type=float, default=None, help="seconds between steps (5; quick 2.5)")
    r.add_argument(
        "--steps",
        default=None,
        help="comma-separated steps: move:POP, add:N, drain:N, crash "
        f"(default {','.join(DEFAULT_STEPS)})",
    )
    r.add_argument(
        "--redis-tls",
        action="store_true",
        help="TLS to and between the Redis nodes (throw-away certificates made with openssl)",
    )
    r.add_argument(
        "--fault",
        choices=[*_fault_names(), "all"],
        default=None,
        help="instead of the modes: run a fault's scenario in flowstate mode (or all of them) "
        "and print what was lost",
    )
    sub.add_parser("up", help="build the lab and keep it until Ctrl-C")
    sub.add_parser("down", help="remove what a killed or crashed lab left behind")
    return p


def _fault_names() -> list[str]:
    from deploy.labkit.faults import FAULTS

    return list(FAULTS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": _cmd_run, "up": _cmd_up, "down": _cmd_down}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; everything was torn down", file=sys.stderr)
        return 130
