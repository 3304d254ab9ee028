"""`flowstate backends ls|drain|undrain|weight|reset`, `flowstate stats` and `flowstate reload`: a
running forwarder, through its control API."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from flowstate.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    control_socket,
    duration,
    emit_json,
    json_option,
    rate,
    seconds,
    socket_option,
    table,
    wants_json,
)
from flowstate.control_client import ChangeAnswer, ControlClient, ControlError, VipSelector
from flowstate.errors import UsageError
from forwarder.metrics import VERDICTS, diff_histogram, quantile

#: Engine verdicts that are not drops and not packets for us.
_PASSES = ("pass_not_ip", "pass_not_vip", "pass_not_service")
#: The Redis store client's reads around failed masters (`[store] read_from_replicas`).
_REPLICA_COUNTERS = ("masters_failed", "replica_reads", "replica_failures", "failed_items")
#: Slow-path and ring counters shown among the drops.
_OTHER_DROPS = (
    ("engine", "tx_errors"),
    ("core", "miss_queue_full"),
    ("core", "record_rejected"),
    ("rings", "tx_errors"),
    ("rings", "rx_kernel_drops"),
    ("rings", "rx_truncated"),
)


def add_parsers(sub: Any) -> None:
    b = sub.add_parser(
        "backends",
        help="list, drain, undrain or re-weight backends of a running forwarder",
        description="Backends of a running forwarder, through its control API. Changes apply "
        "to every worker at once and are runtime overrides of the config file: kept in the "
        "forwarder's state file ([control] state_file), they outlive reloads and restarts until "
        "cleared (`undrain`, `weight --reset`, `reset`), or until the config file says the same "
        "or no longer has the backend. `ls` marks them with '*'. Draining: no new flows; pinned "
        "flows continue until they end.",
    )
    bsub = b.add_subparsers(
        dest="backends_cmd", metavar="{ls,drain,undrain,weight,reset}", required=True
    )
    ls = bsub.add_parser(
        "ls",
        help="backends per VIP: weight, state (* runtime override), health, share of new flows",
    )
    ls.add_argument("--vip", metavar="V", type=_vip, help="only this VIP (ADDR[:PORT][/PROTO])")
    _common(ls)
    ls.set_defaults(run=run_backends_ls)
    for name, doc in (
        ("drain", "stop sending new flows to a backend; pinned flows continue"),
        ("undrain", "let a drained backend take new flows again (clears a drain override)"),
        (
            "weight",
            "set a backend's weight (0..65535; 0 takes no new flows), or --reset it to the "
            "config file's",
        ),
        ("reset", "clear a backend's runtime overrides: the config file's state and weight"),
    ):
        p = bsub.add_parser(name, help=doc, description=doc[0].upper() + doc[1:] + ".")
        p.add_argument("backend", metavar="BACKEND", help="the backend's IPv6 address")
        if name == "weight":
            p.add_argument("weight", metavar="WEIGHT", type=_weight, nargs="?", help="new weight")
            p.add_argument(
                "--reset",
                action="store_true",
                help="back to the config file's weight (clears the weight override)",
            )
        p.add_argument(
            "--vip", metavar="V", type=_vip, help="only on this VIP (default: every VIP)"
        )
        _common(p)
        p.set_defaults(run=run_backends_change, change=name)

    s = sub.add_parser(
        "stats",
        help="counters of a running forwarder (pps, hits, misses, store latency, drops)",
        description="Counters of a running forwarder, all workers summed (and per worker). "
        "Rates come from two samples --interval apart; --watch repeats.",
    )
    s.add_argument(
        "--watch", metavar="SECONDS", type=_interval, help="refresh every SECONDS until Ctrl-C"
    )
    s.add_argument(
        "--interval",
        metavar="SECONDS",
        type=_interval,
        default=1.0,
        help="time between the two samples of a single view (default 1)",
    )
    _common(s)
    s.set_defaults(run=run_stats)

    r = sub.add_parser(
        "reload",
        help="make a running forwarder re-read its config file (as SIGHUP does)",
        description="Make a running forwarder re-read its config file, on every worker. VIPs, "
        "backends, weights, states and health checks change without dropping a flow (flows of "
        "removed backends move); settings read at start-up are listed as needing a restart. "
        "An invalid file changes nothing (exit 1, the field named).",
    )
    _common(r)
    r.set_defaults(run=run_reload)


def _common(p: argparse.ArgumentParser) -> None:
    json_option(p)
    socket_option(p)


def _vip(text: str) -> VipSelector:
    try:
        return VipSelector.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _weight(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a weight (0..65535)")
    return int(text)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0.05..3600)")
    return value


async def _client(args: argparse.Namespace) -> ControlClient:
    return await ControlClient.connect(control_socket(args))


def _refused(exc: ControlError) -> Exception:
    """Input the forwarder rejected is the caller's (exit 2); anything else a failure."""
    if exc.code in ("unknown_vip", "unknown_backend", "bad_params"):
        return UsageError(exc.message)
    return CommandFailed(f"forwarder: {exc.message}")


# --- backends ------------------------------------------------------------------------------------


async def run_backends_ls(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        try:
            answer = await client.backends(args.vip)
        except ControlError as exc:
            raise _refused(exc) from None
    if wants_json(args):
        emit_json(answer)
    else:
        state_file = dict(answer).get("state_file")
        print(format_backends(answer["vips"], state_file if isinstance(state_file, str) else None))
    return EXIT_OK


def format_backends(vips: Sequence[Any], state_file: str | None = None) -> str:
    """The `backends ls` table; a value that is a runtime override (not the config file's)
    has a '*', and the footnote gives the config file's value."""
    rows: list[list[str]] = []
    notes: list[str] = []
    for v in vips:
        for b in v["backends"]:
            mark = wmark = ""
            was: list[str] = []
            if b["state"] != b["configured_state"]:
                mark = "*"
                was.append(b["configured_state"])
            if b["weight"] != b["configured_weight"]:
                wmark = "*"
                was.append(f"weight {b['configured_weight']}")
            if was:
                notes.append(f"{b['address']} on {v['vip']}: the config file says {', '.join(was)}")
            healthy = {None: "unchecked", True: "healthy", False: "DOWN"}[b["healthy"]]
            share = 100.0 * b["slots"] / v["maglev_size"] if v["maglev_size"] else 0.0
            rows.append(
                [
                    v["vip"],
                    b["address"],
                    str(b["weight"]) + wmark,
                    b["state"] + mark,
                    healthy,
                    f"{share:.1f}%",
                ]
            )
    text = table(["VIP", "BACKEND", "WEIGHT", "STATE", "HEALTH", "NEW FLOWS"], rows)
    if notes:
        kept = (
            f"kept in {state_file} across reloads and restarts"
            if state_file
            else "in memory only: lost at the next reload or restart"
        )
        text += "".join(f"\n* {note}" for note in notes)
        text += (
            f"\n* changed at runtime: an override of the config file, {kept}; "
            "`flowstate backends reset BACKEND` clears it"
        )
    return text


async def run_backends_change(args: argparse.Namespace) -> int:
    if args.change == "weight" and (args.weight is None) != args.reset:
        raise UsageError("weight: give either WEIGHT or --reset")
    # A change replans every worker, as a reload does (forwarder.control.PEER_CHANGE_TIMEOUT_S).
    sock = control_socket(args)
    async with await ControlClient.connect(sock, timeout=RELOAD_TIMEOUT_S) as client:
        try:
            target = {"backend": args.backend, "vip": args.vip and args.vip.to_params()}
            if args.change == "drain":
                answer = await client.drain(args.backend, args.vip)
            elif args.change == "undrain":
                answer = await client.undrain(args.backend, args.vip)
            elif args.change == "reset":
                answer = await client.call("reset", target)
            elif args.reset:
                answer = await client.call("weight", {**target, "reset": True})
            else:
                answer = await client.set_weight(args.backend, args.weight, args.vip)
        except ControlError as exc:
            raise _refused(exc) from None
    if wants_json(args):
        emit_json(answer)
    else:
        print(format_change(args.change, args.backend, answer))
    for err in answer["errors"]:
        print(f"flowstate: worker {err['worker']} not changed: {err['message']}", file=sys.stderr)
    save_error = dict(answer).get("save_error")
    if save_error:
        print(f"flowstate: change live but {save_error}", file=sys.stderr)
    return EXIT_FAILED if answer["errors"] or save_error else EXIT_OK


def format_change(change: str, backend: str, answer: ChangeAnswer) -> str:
    workers = ", ".join(str(w) for w in sorted(answer["workers"]))
    if not answer["changed"]:
        return f"{backend}: nothing to change (already so) on workers {workers}"
    lines = [
        f"{c['backend']} on {c['vip']}: {c['state']}, weight {c['weight']}"
        for c in answer["changed"]
    ]
    done = {
        "drain": "drained",
        "undrain": "undrained",
        "weight": "re-weighted",
        "reset": "reset to the config file",
    }[change]
    lines.append(f"{done} on workers {workers}")
    return "\n".join(lines)


# --- reload --------------------------------------------------------------------------------------

#: A reload or a backend change rebuilds Maglev tables (tens of ms per VIP, more on a loaded
#: host) on every worker; worker 0 waits for the others up to PEER_CHANGE_TIMEOUT_S (20 s).
RELOAD_TIMEOUT_S = 30.0


async def run_reload(args: argparse.Namespace) -> int:
    sock = control_socket(args)
    async with await ControlClient.connect(sock, timeout=RELOAD_TIMEOUT_S) as client:
        try:
            answer: dict[str, Any] = await client.call("reload")
        except ControlError as exc:
            raise _refused(exc) from None
    if wants_json(args):
        emit_json(answer)
    else:
        print(format_reload(answer))
    for err in answer["errors"]:
        print(f"flowstate: worker {err['worker']} not reloaded: {err['message']}", file=sys.stderr)
    return EXIT_FAILED if answer["errors"] else EXIT_OK


def format_reload(answer: dict[str, Any]) -> str:
    workers = ", ".join(str(w) for w in sorted(answer["workers"]))
    changes: list[str] = answer["changes"]
    count = f"{len(changes)} change{'s' * (len(changes) != 1)}" if changes else "no changes"
    lines = [f"reloaded {answer['path']} on workers {workers}: {count}"]
    lines.extend(f"  {c}" for c in changes)
    if answer["needs_restart"]:
        lines.append(
            "needs a restart (still running the old value): " + ", ".join(answer["needs_restart"])
        )
    return "\n".join(lines)


# --- stats ---------------------------------------------------------------------------------------


def _sum(workers: Sequence[dict[str, Any]], section: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in workers:
        if section == "rings":
            for ring in w.get("rings", []):
                for k, v in ring["counters"].items():
                    out[k] = out.get(k, 0) + v
        else:
            for k, v in w.get(section, {}).items():
                out[k] = out.get(k, 0) + v
    return out


def _latency(workers: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for w in workers:
        for op, snap in w.get("store_latency", {}).items():
            acc = out.get(op)
            if acc is None:
                out[op] = {**snap, "counts": list(snap["counts"])}
            else:
                acc["counts"] = [a + b for a, b in zip(acc["counts"], snap["counts"], strict=True)]
                for k in ("sum", "count", "errors"):
                    acc[k] += snap[k]
    return out


def summarize(
    cur: dict[str, Any], prev: dict[str, Any] | None, elapsed_s: float | None
) -> dict[str, Any]:
    """Totals and (with a previous sample) rates of a `stats` answer, all workers summed."""
    workers = cur["workers"]
    engine, core, rings = _sum(workers, "engine"), _sum(workers, "core"), _sum(workers, "rings")
    verdicts = {k: v for k, v in engine.items() if k in VERDICTS}
    packets = sum(verdicts.values())
    latency = _latency(workers)
    out: dict[str, Any] = {
        "pop": cur["pop"],
        "workers": len(workers),
        "uptime_s": min((w["uptime_s"] for w in workers), default=0.0),
        "store_connected": all(w["store"]["connected"] for w in workers),
        "bgp": cur.get("bgp"),
        "packets": packets,
        "hits": engine.get("forward", 0),
        "new": engine.get("new", 0),
        "misses": engine.get("miss", 0),
        "passed": sum(engine.get(k, 0) for k in _PASSES),
        "flows": engine.get("flows", 0),
        "capacity": engine.get("capacity", 0),
        "lookups": core.get("lookups", 0),
        "lookup_hits": core.get("lookup_hits", 0),
        "lookup_not_found": core.get("lookup_not_found", 0),
        "lookup_failed": core.get("lookup_failed", 0),
        "fallbacks": core.get("fallbacks", 0),
        "pins": core.get("pins", 0),
        "drops": _drops(verdicts, engine, core, rings),
        "store_latency": {},
    }
    client = [w.get("store", {}).get("counters", {}) for w in workers]
    if any(k in c for c in client for k in _REPLICA_COUNTERS):  # the Redis store's client
        out["store_client"] = {k: sum(c.get(k, 0) for c in client) for k in _REPLICA_COUNTERS}
    prev_latency = _latency(prev["workers"]) if prev is not None else {}
    for op, snap in latency.items():
        window = diff_histogram(snap, prev_latency.get(op)) if prev is not None else snap
        use = window if window["count"] else snap
        out["store_latency"][op] = {
            "calls": snap["count"],
            "errors": snap["errors"],
            "p50_s": quantile(use, 0.5),
            "p99_s": quantile(use, 0.99),
            "avg_s": use["sum"] / use["count"] if use["count"] else None,
        }
    if prev is not None and elapsed_s:
        before = summarize(prev, None, None)
        out["rates"] = {
            k: max(0, out[k] - before[k]) / elapsed_s
            for k in ("packets", "hits", "new", "misses", "lookups", "fallbacks", "pins")
        }
        out["interval_s"] = elapsed_s
    if len(workers) > 1:
        out["per_worker"] = [
            {
                "worker": w["worker"],
                "pid": w["pid"],
                "flows": w["engine"].get("flows", 0),
                "packets": sum(v for k, v in w["engine"].items() if k in VERDICTS),
            }
            for w in workers
        ]
    return out


def _drops(
    verdicts: dict[str, int], engine: dict[str, int], core: dict[str, int], rings: dict[str, int]
) -> dict[str, int]:
    """Non-zero drop counters: engine drop_* verdicts, then slow-path and ring losses."""
    out = {k: v for k, v in verdicts.items() if k.startswith("drop_") and v}
    for section, name in _OTHER_DROPS:
        value = {"engine": engine, "core": core, "rings": rings}[section].get(name, 0)
        if value:
            out[name if section != "engine" else f"engine_{name}"] = value
    return out


def _bgp_line(bgp: dict[str, Any] | None) -> list[str]:
    """The announce state (forwarder.bgp) in `stats`: nothing without [bgp]."""
    if bgp is None:
        return []
    if "error" in bgp:
        return [f"bgp        announcer not answering: {bgp['error']}"]
    state = {True: "ANNOUNCED", False: "WITHDRAWN", None: "UNKNOWN"}[bgp["announced"]]
    return [f"bgp        {state} ({', '.join(bgp['protocols'])}): {bgp['reason']}"]


def format_stats(s: dict[str, Any], errors: Sequence[dict[str, Any]] = ()) -> str:
    r = s.get("rates", {})

    def n(key: str) -> str:
        return f"{s[key]}" + (f" ({rate(r[key])})" if key in r else "")

    store = "connected" if s["store_connected"] else "NOT CONNECTED (Maglev fallback)"
    lines = [
        f"forwarder {s['pop']}: {s['workers']} worker{'s' * (s['workers'] != 1)}, "
        f"up {duration(s['uptime_s'] * 1000)}, store {store}",
        *_bgp_line(s.get("bgp")),
        f"packets    {s['packets']}" + (f"  {rate(r['packets'])[:-2]} pps" if r else ""),
        f"local      hits {n('hits')}, new flows {n('new')}, misses {n('misses')}, "
        f"not ours {s['passed']}",
        f"flows      {s['flows']} in the table (capacity {s['capacity']})",
        f"store      lookups {n('lookups')}: found {s['lookup_hits']}, not found "
        f"{s['lookup_not_found']}, failed {s['lookup_failed']}; pins {n('pins')}",
    ]
    for op, lat in s["store_latency"].items():
        if lat["calls"]:
            lines.append(
                f"  {op:<8} {lat['calls']} calls, {lat['errors']} failed; p50 "
                f"{seconds(lat['p50_s'])}, p99 {seconds(lat['p99_s'])}, avg {seconds(lat['avg_s'])}"
            )
    sc = s.get("store_client")
    if sc is not None:
        lines.append(
            f"  replicas {sc['replica_reads']} lookups read from a replica, masters failed "
            f"{sc['masters_failed']}, replica failures {sc['replica_failures']}; "
            f"{sc['failed_items']} lookups unanswered"
        )
    lines.append(f"fallbacks  {n('fallbacks')} (Maglev instead of the store)")
    drops = ", ".join(f"{k} {v}" for k, v in sorted(s["drops"].items())) or "none"
    lines.append(f"drops      {drops}")
    for w in s.get("per_worker", []):
        lines.append(
            f"  worker {w['worker']} (pid {w['pid']}): {w['packets']} packets, {w['flows']} flows"
        )
    for e in errors:
        lines.append(f"  worker {e['worker']}: NO ANSWER ({e['message']})")
    return "\n".join(lines)


async def run_stats(args: argparse.Namespace) -> int:
    as_json = wants_json(args)
    interval = args.watch if args.watch is not None else args.interval
    async with await _client(args) as client:
        prev = await client.stats()
        taken = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            cur = await client.stats()
            now = time.monotonic()
            summary = summarize(cur, prev, now - taken)
            if as_json:
                emit_json({"summary": summary, "stats": cur})
            else:
                if args.watch is not None and sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(format_stats(summary, cur.get("errors", [])))
            sys.stdout.flush()
            if args.watch is None:
                return EXIT_OK
            prev, taken = cur, now
