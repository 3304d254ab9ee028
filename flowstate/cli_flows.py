"""`flowstate flows get|ls|count`: the pinnings stored in the Redis Cluster.

Records hold no client address (the key is a hash of the 5-tuple), so `ls` and `count` show and
filter by what a record holds: backend, VIP address, POP, age and TTL.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import sys
import time
from dataclasses import dataclass
from typing import Any

from flowstate.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    cluster_options,
    cluster_settings,
    config_option,
    connect_store,
    duration,
    emit_json,
    five_tuple,
    five_tuple_arguments,
    json_option,
    load_forwarder_config,
    table,
    wants_json,
)
from flowstate.errors import UsageError
from flowstate.flow import KEY_PREFIX, key_slot
from flowstate.record import FlowRecord
from flowstate.store.base import ScanEntry

#: Columns of `flows ls` (fixed widths: the listing streams, it never holds the whole scan).
LS_COLUMNS = (("KEY", 36), ("BACKEND", 24), ("VIP", 16), ("POP", 10), ("AGE", 14), ("TTL", 0))


def add_parsers(sub: Any) -> None:
    flows = sub.add_parser(
        "flows",
        help="flow pinnings stored in the cluster",
        description="Flow pinnings stored in the Redis Cluster.",
    )
    fsub = flows.add_subparsers(dest="flows_cmd", metavar="{get,ls,count}", required=True)

    get = fsub.add_parser(
        "get",
        help="the stored record of one flow",
        description="The stored record of one flow (backend, POP that pinned it, age, TTL left) "
        "and the slot and nodes it lives on. Exits 1 if there is no record.",
    )
    five_tuple_arguments(get)
    _common(get)
    get.set_defaults(run=run_get)

    for name, doc in (
        ("ls", "list stored flows (streams; human table or JSON lines)"),
        ("count", "count stored flows, optionally grouped"),
    ):
        p = fsub.add_parser(
            name,
            help=doc,
            description=doc[0].upper() + doc[1:] + ". Scans every master with SCAN (cursor-based, "
            "bounded memory). Records hold no client address: filter by what they hold.",
        )
        p.add_argument("--backend", metavar="B", help="only flows pinned to this backend (IPv6)")
        p.add_argument("--vip", metavar="V", help="only flows to this VIP address")
        p.add_argument("--pop", metavar="P", help="only flows pinned by this POP")
        p.add_argument("--limit", metavar="N", type=_positive, help="stop after N flows")
        if name == "count":
            p.add_argument(
                "--by",
                choices=["backend", "vip", "pop"],
                help="also count per backend, VIP or POP",
            )
        _common(p)
        p.set_defaults(run=run_ls if name == "ls" else run_count)


def _common(p: argparse.ArgumentParser) -> None:
    json_option(p)
    cluster_options(p)
    config_option(p, "forwarder config file: cluster seeds and password if not given otherwise")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


async def _store(args: argparse.Namespace) -> Any:
    settings = cluster_settings(args, load_forwarder_config(args.config))
    if settings is None:
        raise UsageError("no cluster given: use --seeds HOST:PORT,... (or $FLOWSTATE_REDIS_SEEDS)")
    return await connect_store(settings)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def record_view(rec: FlowRecord, ttl_ms: int | None, now: int) -> dict[str, Any]:
    return {
        "backend": str(rec.backend),
        "vip": str(rec.vip),
        "pop": rec.pop,
        "created_ms": rec.created_ms,
        "age_ms": now - rec.created_ms,
        "ttl_ms": ttl_ms,
    }


def slot_nodes(store: Any, slot: int) -> list[str]:
    """Master first, then replicas, of a slot, from the client's cached slot map."""
    rc = getattr(store, "_rc", None)  # redis-py's cluster client; its slot map is the truth
    try:
        nodes = rc.nodes_manager.slots_cache.get(slot) or [] if rc is not None else []
    except AttributeError:
        nodes = []
    return [f"{n.host}:{n.port}" for n in nodes]


# --- get -----------------------------------------------------------------------------------------


async def run_get(args: argparse.Namespace) -> int:
    t = five_tuple(args)
    store = await _store(args)
    try:
        (rec,) = await store.lookup_many([t])
        ttl = await store.ttl_ms(t) if rec is not None else None
        key = t.key()
        slot = key_slot(key)
        nodes = slot_nodes(store, slot)
    finally:
        await store.close()
    answer: dict[str, Any] = {
        "flow": str(t),
        "found": rec is not None,
        "key": key_text(key),
        "slot": slot,
        "master": nodes[0] if nodes else None,
        "replicas": nodes[1:],
    }
    if rec is not None:
        answer["record"] = record_view(rec, ttl, now_ms())
    if wants_json(args):
        emit_json(answer)
    else:
        print(format_get(answer))
    return EXIT_OK if rec is not None else EXIT_FAILED


def key_text(key: bytes) -> str:
    """``fs1:<32 hex digits>``."""
    return KEY_PREFIX.decode() + key[len(KEY_PREFIX) :].hex()


def format_get(a: dict[str, Any]) -> str:
    where = f"slot {a['slot']}"
    if a["master"]:
        where += f" on {a['master']}"
        if a["replicas"]:
            where += f" (replicas {', '.join(a['replicas'])})"
    lines = [f"flow      {a['flow']}", f"key       {a['key']}  {where}"]
    rec = a.get("record")
    if rec is None:
        lines.append("record    none (never pinned, expired, or lost in a failover)")
        return "\n".join(lines)
    lines += [
        f"backend   {rec['backend']}",
        f"vip       {rec['vip']}",
        f"pop       {rec['pop']}",
        f"age       {duration(rec['age_ms'])}",
        f"ttl       {duration(rec['ttl_ms'])} left",
    ]
    return "\n".join(lines)


# --- ls / count ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowFilter:
    backend: bytes | None = None
    vip: bytes | None = None
    pop: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FlowFilter:
        backend = vip = None
        if args.backend:
            try:
                backend = ipaddress.IPv6Address(args.backend).packed
            except ValueError:
                raise UsageError(f"--backend: {args.backend!r} is not an IPv6 address") from None
        if args.vip:
            try:
                vip = ipaddress.ip_address(args.vip).packed
            except ValueError:
                raise UsageError(
                    f"--vip: {args.vip!r} is not an address (records hold the VIP address only)"
                ) from None
        return cls(backend, vip, args.pop)

    @property
    def active(self) -> bool:
        return self.backend is not None or self.vip is not None or self.pop is not None

    def matches(self, entry: ScanEntry) -> bool:
        rec = entry.record
        if rec is None:
            return not self.active  # undecodable records only show unfiltered
        return (
            (self.backend is None or rec.backend_ip == self.backend)
            and (self.vip is None or rec.vip_ip == self.vip)
            and (self.pop is None or rec.pop == self.pop)
        )


def entry_view(entry: ScanEntry, now: int) -> dict[str, Any]:
    view: dict[str, Any] = {"key": key_text(entry.key)}
    if entry.record is None:
        view["error"] = entry.error
        view["ttl_ms"] = entry.ttl_ms
    else:
        view.update(record_view(entry.record, entry.ttl_ms, now))
    return view


def format_row(view: dict[str, Any]) -> str:
    if "error" in view:
        cells = [view["key"], f"(bad record: {view['error']})"]
        return "  ".join(cells)
    values = [
        view["key"],
        view["backend"],
        view["vip"],
        view["pop"],
        duration(view["age_ms"]),
        duration(view["ttl_ms"]),
    ]
    return _row(values)


def _row(values: list[str]) -> str:
    cells = [v.ljust(w) for v, (_, w) in zip(values, LS_COLUMNS, strict=True)]
    return "  ".join(cells).rstrip()


async def _scan(store: Any, flt: FlowFilter, limit: int | None) -> Any:
    """Matching entries, streamed; stops after `limit`."""
    n = 0
    async for entry in store.scan(count=1000):
        if flt.matches(entry):
            yield entry
            n += 1
            if limit is not None and n >= limit:
                return


async def run_ls(args: argparse.Namespace) -> int:
    flt = FlowFilter.from_args(args)
    as_json = wants_json(args)
    store = await _store(args)
    shown = 0
    try:
        if not as_json:
            print(_row([h for h, _ in LS_COLUMNS]))
        scan = _scan(store, flt, args.limit)
        try:
            async for entry in scan:
                view = entry_view(entry, now_ms())
                if as_json:
                    emit_json(view)
                else:
                    print(format_row(view))
                shown += 1
        finally:
            await scan.aclose()
    finally:
        await store.close()
    if not as_json:
        print(f"({shown} flow{'s' * (shown != 1)})", file=sys.stderr)
    return EXIT_OK


async def run_count(args: argparse.Namespace) -> int:
    flt = FlowFilter.from_args(args)
    store = await _store(args)
    counts: collections.Counter[str] = collections.Counter()
    total = bad = 0
    try:
        scan = _scan(store, flt, args.limit)
        try:
            async for entry in scan:
                total += 1
                if entry.record is None:
                    bad += 1
                elif args.by:
                    counts[group_of(entry.record, args.by)] += 1
        finally:
            await scan.aclose()
    finally:
        await store.close()
    answer: dict[str, Any] = {"count": total, "bad_records": bad}
    if args.by:
        answer["by"] = args.by
        answer["groups"] = dict(counts.most_common())
    if wants_json(args):
        emit_json(answer)
    else:
        print(format_count(answer))
    return EXIT_OK


def group_of(rec: FlowRecord, by: str) -> str:
    if by == "backend":
        return str(rec.backend)
    if by == "vip":
        return str(rec.vip)
    return rec.pop


def format_count(a: dict[str, Any]) -> str:
    text = f"{a['count']} flow{'s' * (a['count'] != 1)}"
    if a["bad_records"]:
        text += f" ({a['bad_records']} undecodable)"
    if "groups" in a:
        rows = [[k, str(v)] for k, v in a["groups"].items()]
        text += "\n" + table([a["by"].upper(), "FLOWS"], rows)
    return text
