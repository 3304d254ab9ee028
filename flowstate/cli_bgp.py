"""`flowstate bgp`, `flowstate drain-pop` and `flowstate undrain-pop`: the BGP announcer that a
running forwarder's supervisor runs (forwarder.bgp), through its socket ``<control socket>.bgp``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flowstate.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    control_socket,
    emit_json,
    json_option,
    socket_option,
    wants_json,
)
from flowstate.control_client import ControlClient, ControlUnavailable
from forwarder.bgp import announcer_socket


def add_parsers(sub: Any) -> None:
    for name, method, doc, description in (
        (
            "bgp",
            "bgp",
            "whether this POP announces its VIPs, and why",
            "Show whether the forwarder announces this POP's VIPs through BIRD, why (health "
            "problems, drain), and its workers' heartbeats.",
        ),
        (
            "drain-pop",
            "drain_pop",
            "withdraw this POP's VIPs from BGP until undrain-pop",
            "Withdraw this POP's VIPs from BGP: traffic moves to other POPs, and connections "
            "that move with it keep their backends through the shared store. The forwarder keeps "
            "forwarding what still arrives. The drain lasts until `flowstate undrain-pop`, also "
            "across forwarder restarts when [bgp] drain_file is set (the default).",
        ),
        (
            "undrain-pop",
            "undrain_pop",
            "announce this POP's VIPs again (once healthy)",
            "End a drain: the VIPs are announced again as soon as the forwarder is healthy.",
        ),
    ):
        p = sub.add_parser(name, help=doc, description=description)
        json_option(p)
        socket_option(p)
        p.set_defaults(run=run_bgp, bgp_method=method)


async def run_bgp(args: argparse.Namespace) -> int:
    path = announcer_socket(control_socket(args))
    try:
        client = await ControlClient.connect(path)
    except ControlUnavailable as exc:
        raise CommandFailed(
            f"no BGP announcer answers ({exc.message}); is the forwarder running with "
            '[bgp] kind = "bird"? (--socket names its control socket)'
        ) from None
    async with client:
        status: dict[str, Any] = await client.call(args.bgp_method)
    if wants_json(args):
        emit_json(status)
    else:
        print(format_bgp(status))
    if status.get("warning"):
        print(f"flowstate: warning: {status['warning']}", file=sys.stderr)
    if args.bgp_method == "drain_pop" and status["announced"] is not False:
        print("flowstate: the VIPs are not withdrawn yet (BIRD error above)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def format_bgp(s: dict[str, Any]) -> str:
    """`flowstate bgp`'s human view of an announcer status."""
    state = {True: "ANNOUNCED", False: "WITHDRAWN", None: "UNKNOWN (BIRD not told yet)"}
    since = f" for {s['since_s']:.1f} s" if s.get("since_s") is not None else ""
    lines = [
        f"POP {s['pop']}: {state[s['announced']]}{since} "
        f"(BIRD protocols {', '.join(s['protocols'])}): {s['reason']}"
    ]
    if s["drained"]:
        lines.append("  drained: yes (flowstate undrain-pop announces again)")
    if s["problems"]:
        lines.append(f"  problems: {'; '.join(s['problems'])}")
    if s.get("bird_error"):
        lines.append(f"  BIRD error: {s['bird_error']} (retrying)")
    for w in s["workers"]:
        beat = w["heartbeat_ms_ago"]
        seen = f", heartbeat {beat} ms ago" if beat is not None else ""
        lines.append(f"  worker {w['worker']} (pid {w['pid']}): {w['state']}{seen}")
    return "\n".join(lines)
