"""Entry point of `flowstate-forwarder`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

# Re-exported: the capability code lives in forwarder.privileges.
from forwarder.privileges import (
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    WORKER_CAPABILITIES,
    drop_capabilities,
)

if TYPE_CHECKING:
    from forwarder.config import ForwarderConfig
    from forwarder.privileges import Identity

log = logging.getLogger("flowstate.forwarder")

__all__ = ["CAP_NET_ADMIN", "CAP_NET_RAW", "WORKER_CAPABILITIES", "drop_capabilities", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowstate-forwarder",
        description="Per-POP anycast forwarder: pins flows in Redis Cluster, tunnels to backends.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--check-config", metavar="FILE", help="validate a config file and exit")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (flow events are logged at debug; never per packet)",
    )
    p.add_argument(
        "--keep-offloads",
        action="store_true",
        help="do not turn GRO/LRO/GSO/TSO off on the receive interfaces",
    )
    p.add_argument(
        "--withdraw",
        action="store_true",
        help="with --config: withdraw the VIPs from BIRD ([bgp] protocols) and exit; "
        "for systemd's ExecStopPost, in case the forwarder could not do it itself",
    )
    # Internal: how the supervisor starts its worker processes.
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fanout-group", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_config(path: str) -> int:
    """`--check-config`: validate, print a summary (exit 0) or the error, no traceback (exit 1)."""
    from flowstate.errors import ConfigError
    from forwarder.config import load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"flowstate-forwarder: config error: {exc.field}: {exc.reason}", file=sys.stderr)
        return 1
    print(f"flowstate-forwarder: config OK: {config.summary()}")
    return 0


def run_worker(
    config: ForwarderConfig,
    fanout_group: int,
    worker: int = 0,
    config_path: str | None = None,
    heartbeat_fd: int | None = None,
) -> int:
    """Run one worker in this process until SIGINT/SIGTERM; SIGHUP reloads `config_path`."""
    import asyncio
    from pathlib import Path

    import uvloop

    from forwarder.service import serve

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # Until the event loop takes SIGHUP over, a reload request must not end the process
    # (SIGHUP's default): the config is being read now anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if config.user is not None:
        if not become_user(config, config_path):
            return 1
    elif config.drop_capabilities:
        # Before the worker opens anything: its packet rings need only what it keeps, and
        # nothing it does later (control socket, store, health checks, reload) needs more.
        try:
            kept = drop_capabilities()
        except OSError as exc:
            print(f"flowstate-forwarder: cannot drop capabilities: {exc}", file=sys.stderr)
            return 1
        log.info("capabilities: kept %#x (CAP_NET_RAW, CAP_NET_ADMIN), dropped the rest", kept)
    try:
        path = Path(config_path) if config_path else None
        asyncio.run(
            serve(
                config,
                fanout_group=fanout_group,
                worker=worker,
                config_path=path,
                heartbeat_fd=heartbeat_fd,
            )
        )
    except OSError as exc:
        print(f"flowstate-forwarder: {exc}", file=sys.stderr)
        return 1
    return 0


def become_user(config: ForwarderConfig, config_path: str | None) -> bool:
    """With `user`: give it the control socket's directory, load the worker's code, switch to
    it (CAP_NET_RAW and CAP_NET_ADMIN kept), then check that it can read what a worker reads
    later. False (and why on stderr) if any of it fails: the worker must not run half-switched
    or find out at its first reload or reconnect."""
    from forwarder import privileges

    assert config.user is not None
    try:
        identity = privileges.resolve(config.user, config.group)
        if os.geteuid() == 0:
            privileges.give_socket_directory(config.control.socket, identity)
            _give_state_directory(config, identity)
        privileges.preload()
        kept = privileges.switch_user(identity)
    except (LookupError, OSError) as exc:
        print(f"flowstate-forwarder: cannot run as user {config.user}: {exc}", file=sys.stderr)
        return False
    problems = privileges.unreadable(privileges.files_to_read(config, config_path))
    if problems:
        for problem in problems:
            print(
                f"flowstate-forwarder: user {identity.user} cannot read {problem}", file=sys.stderr
            )
        return False
    log.info("running as user %s, no new privileges", identity)
    log.info("capabilities: kept %#x (CAP_NET_RAW, CAP_NET_ADMIN), dropped the rest", kept)
    return True


def _give_state_directory(config: ForwarderConfig, identity: Identity) -> None:
    """The state file of runtime overrides is written by worker 0 (one writer, no round trip
    to the root supervisor): with `user`, its directory must be the user's."""
    from forwarder import overrides

    if config.control.state_file is not None:
        overrides.give_directory(config.control.state_file, identity)


def _can_become_user(config: ForwarderConfig, args_config: str | None) -> bool:
    """The supervisor's checks before it starts workers that would switch to `user`: whether
    they can, and the control socket's directory given to it (so that the first problem is
    reported once, at start, not by each worker exiting in turn)."""
    from forwarder import privileges

    assert config.user is not None
    try:
        identity = privileges.resolve(config.user, config.group)
        privileges.check_can_switch(identity)
        if os.geteuid() == 0:
            privileges.give_socket_directory(config.control.socket, identity)
            _give_state_directory(config, identity)
    except (LookupError, OSError) as exc:
        print(f"flowstate-forwarder: cannot run as user {config.user}: {exc}", file=sys.stderr)
        return False
    files = privileges.files_to_read(config, args_config)
    problems = privileges.unreadable_as(identity, files)
    for problem in problems:
        print(f"flowstate-forwarder: user {identity.user} cannot read {problem}", file=sys.stderr)
    return not problems


def supervise(args: argparse.Namespace, config: ForwarderConfig) -> int:
    """Start `workers` processes sharing each interface through PACKET_FANOUT; restart crashed
    ones; stop them all on SIGINT/SIGTERM; pass SIGHUP (reload) on to each.

    With [bgp] kind = "bird" it also runs the announcer (forwarder.bgp): it sees a worker exit at
    once and withdraws, re-announces once the restarted worker is healthy, and on SIGINT/SIGTERM
    withdraws before the workers stop."""
    from forwarder.bgp import Announcer
    from forwarder.config import BgpKind

    group = (os.getpid() & 0x7FFF) or 1
    cmd = [sys.executable, "-m", "forwarder.daemon", "--config", args.config]
    cmd += ["--log-level", args.log_level, "--fanout-group", str(group), "--keep-offloads"]
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    stop_signal = ""
    announcer = Announcer(config) if config.bgp.kind is BgpKind.BIRD else None
    if announcer is not None:
        try:
            announcer.start()
        except OSError as exc:
            print(f"flowstate-forwarder: {exc}", file=sys.stderr)
            return 1

    def start(i: int) -> subprocess.Popen[bytes]:
        # The worker is born with SIGHUP blocked (a reload before it ignores SIGHUP would end
        # it: the default action); it unblocks it in `main`. Here it waits until after.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            if announcer is not None:
                return announcer.start_worker(i, [*cmd, "--worker", str(i)])
            return subprocess.Popen([*cmd, "--worker", str(i)])
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def stop(sig: int, _frame: object) -> None:
        nonlocal stopping, stop_signal
        stopping = True
        stop_signal = signal.Signals(sig).name
        if announcer is not None:
            announcer.interrupt()  # it withdraws first (below); then the workers stop
            return
        for child in children.values():
            if child.poll() is None:
                child.terminate()

    def reload(_sig: int, _frame: object) -> None:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for i in range(config.workers):
        children[i] = start(i)
    while not stopping:
        if announcer is not None:
            announcer.wait(0.2)
        else:
            time.sleep(0.2)
        for i, child in list(children.items()):
            code = child.poll()
            if code is not None and not stopping:
                log.error("worker %d exited with %s; restarting it", i, code)
                children[i] = start(i)
    if announcer is not None:
        announcer.close(f"forwarder stopping ({stop_signal or 'stopped'})")
        for child in children.values():
            if child.poll() is None:
                child.terminate()
    for child in children.values():
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


def withdraw(config: ForwarderConfig) -> int:
    """`--withdraw`: disable the VIP protocols in BIRD (the forwarder is not running)."""
    from forwarder.bgp import withdraw_now
    from forwarder.config import BgpKind

    if config.bgp.kind is BgpKind.NONE:
        print("flowstate-forwarder: [bgp] kind = 'none': nothing to withdraw")
        return 0
    result = withdraw_now(config)
    protocols = ", ".join(config.bgp.protocols)
    if result.error is not None:
        print(f"flowstate-forwarder: withdraw failed: {result.error}", file=sys.stderr)
        return 1
    print(f"flowstate-forwarder: VIPs withdrawn (BIRD protocols {protocols} disabled)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        # Until the event loop takes SIGHUP over, a reload request must not end the worker
        # (SIGHUP's default) while it starts, loads its code or switches user: the config is
        # read after this anyway. The supervisor started it with SIGHUP blocked.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    if args.check_config:
        return check_config(args.check_config)
    if not args.config:
        build_parser().print_usage(sys.stderr)
        return 2
    from flowstate.errors import ConfigError
    from forwarder.config import load_config

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"flowstate-forwarder: config error: {exc.field}: {exc.reason}", file=sys.stderr)
        return 1
    if args.withdraw:
        return withdraw(config)
    if args.worker is None and not args.keep_offloads:
        from forwarder.neigh import disable_offloads

        for ifname in config.interfaces:
            disable_offloads(ifname)
    if args.worker is None and config.ingress_drop:
        from forwarder import ingress

        vips = [v.address.packed for v in config.vips]
        dropping = ingress.install(config.interfaces, vips)
        try:
            return _run(args, config)
        finally:
            ingress.remove(dropping)
    return _run(args, config)


def _run(args: argparse.Namespace, config: ForwarderConfig) -> int:
    """Supervise workers, or be the one worker."""
    from forwarder.config import BgpKind

    supervised = config.workers > 1 or config.bgp.kind is not BgpKind.NONE
    if args.worker is None and (supervised or config.user is not None):
        # BGP: even one worker runs under the supervisor, which withdraws when it dies. `user`:
        # the supervisor stays root for what needs root after start-up (removing the nft
        # tables, restarting a worker: it loads its code and opens its rings as root).
        from forwarder.control import socket_in_use

        busy = socket_in_use(config.control.socket)
        if busy:
            print(f"flowstate-forwarder: {busy}", file=sys.stderr)
            return 1
        if config.user is not None and not _can_become_user(config, args.config):
            return 1
        return supervise(args, config)
    return run_worker(config, args.fanout_group, args.worker or 0, args.config, args.heartbeat_fd)


if __name__ == "__main__":
    sys.exit(main())
