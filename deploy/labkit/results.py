"""Turning the modes' runs into numbers: per-mode summary, the comparison table, JSON, a PNG.

Which POPs served a connection comes from the router's route timeline over the connection's life
(every request of every connection goes through the router's one best route).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from deploy.labkit.scenario import ModeRun

__all__ = ["comparison_table", "plot_timeline", "summarize", "write_json"]

STORE_COUNTERS = ("lookups", "lookup_hits", "lookup_not_found", "fallbacks", "record_rejected")
EVENT_STYLE = {
    "move": ("tab:blue", "-"),
    "add": ("tab:green", "--"),
    "drain": ("tab:orange", "--"),
    "crash": ("tab:red", ":"),
}
POP_COLOURS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974")


MONITOR_LAG = 0.1
"""The route monitor stamps a change when it reads it, a little after the FIB changed."""


def pops_between(routes: list[tuple[float, str | None]], start: float, end: float) -> list[str]:
    """POPs the router sent the VIP to at some time in [start, end], in order of first use."""
    seen: list[str] = []
    end += MONITOR_LAG
    for i, (t, pop) in enumerate(routes):
        until = routes[i + 1][0] if i + 1 < len(routes) else float("inf")
        if pop is not None and t <= end and until >= start and pop not in seen:
            seen.append(pop)
    return seen


def route_moves(routes: list[tuple[float, str | None]], t_end: float) -> int:
    """Changes of the POP carrying the VIP (a gap without a route between two POPs is one)."""
    pops = [pop for t, pop in routes if pop is not None and t <= t_end]
    return sum(1 for a, b in itertools.pairwise(pops) if a != b)


def flow_view(run: ModeRun, flow: dict[str, Any]) -> dict[str, Any]:
    """One flow for the JSON file: times relative to the start of traffic, POPs that served it."""
    end = flow["end"] if flow["end"] is not None else run.t_end
    start = flow["established"] if flow["established"] is not None else flow["start"]

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - run.t0, 3)

    return {
        "id": flow["id"],
        "kind": flow["kind"],
        "family": flow["family"],
        "client": flow["src"],
        "client_port": flow["sport"],
        "status": flow["status"],
        "error": flow["error"],
        "start": rel(flow["start"]),
        "established": rel(flow["established"]),
        "end": rel(flow["end"]),
        "answers": flow["requests"],
        "longest_silence_s": round(flow["max_gap"], 3),
        "longest_silence_end": rel(flow["max_gap_end"]),
        "backends": flow["backends"],
        "pops": pops_between(run.routes, start, end),
    }


def summarize(run: ModeRun) -> dict[str, Any]:
    """The mode's numbers (what `--json` prints per mode)."""
    tcp = [f for f in run.flows if f["kind"] == "tcp"]
    udp = [f for f in run.flows if f["kind"] == "udp"]
    tcp_status = Counter(f["status"] for f in tcp)
    udp_status = Counter(f["status"] for f in udp)
    views = [flow_view(run, f) for f in tcp]
    store = {k: sum(c.get(k, 0) for c in run.counters.values()) for k in STORE_COUNTERS}
    return {
        "connections": len(tcp),
        "completed": tcp_status["completed"],
        "reset": tcp_status["reset"],
        "stalled": tcp_status["stalled"],
        "failed": tcp_status["failed"],
        "served_by_several_pops": sum(len(v["pops"]) > 1 for v in views),
        "requests": sum(f["requests"] for f in tcp),
        "udp_flows": len(udp),
        "udp_kept_backend": udp_status["completed"],
        "udp_changed_backend": udp_status["moved"],
        "udp_stalled": udp_status["stalled"],
        "route_moves": route_moves(run.routes, run.t_end),
        "bgp_policy_moves": run.policy_moves,
        "backend_changes": run.backend_changes,
        "forwarder_starts": run.forwarder_starts,
        "store": store if run.counters else None,
        "duration_s": round(run.t_end - run.t0, 1),
        "client_paused_s": round(sum(b - a for a, b in run.client_pauses), 2),
        "events": [
            {"t": round(e.t - run.t0, 2), "kind": e.kind, "label": e.label} for e in run.events
        ],
    }


def write_json(path: Path, runs: list[ModeRun], options: dict[str, Any]) -> None:
    """Everything: per mode the summary, the route timeline and every connection and flow."""
    doc: dict[str, Any] = {"options": options, "modes": {}}
    for run in runs:
        doc["modes"][run.mode] = {
            **summarize(run),
            "routes": [
                {"t": round(t - run.t0, 3), "pop": pop} for t, pop in run.routes if t <= run.t_end
            ],
            "pop_counters": run.counters,
            "flows": [flow_view(run, f) for f in run.flows],
        }
    path.write_text(json.dumps(doc, indent=1))


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    """The modes side by side, one row per number."""
    modes = list(summaries)

    def store(s: dict[str, Any], key: str) -> str:
        return "-" if s["store"] is None else str(s["store"][key])

    rows: list[tuple[str, list[str]]] = [
        ("TCP connections", [str(s["connections"]) for s in summaries.values()]),
        ("  completed", [str(s["completed"]) for s in summaries.values()]),
        ("  reset", [str(s["reset"]) for s in summaries.values()]),
        ("  stalled (no progress 2 s)", [str(s["stalled"]) for s in summaries.values()]),
        ("  failed to connect / other", [str(s["failed"]) for s in summaries.values()]),
        ("  served by 2+ POPs", [str(s["served_by_several_pops"]) for s in summaries.values()]),
        ("UDP flows", [str(s["udp_flows"]) for s in summaries.values()]),
        ("  kept their backend", [str(s["udp_kept_backend"]) for s in summaries.values()]),
        ("  answered by 2+ backends", [str(s["udp_changed_backend"]) for s in summaries.values()]),
        ("  stalled", [str(s["udp_stalled"]) for s in summaries.values()]),
        ("route moves (router FIB)", [str(s["route_moves"]) for s in summaries.values()]),
        ("backend changes", [str(s["backend_changes"]) for s in summaries.values()]),
        ("forwarder starts", [str(s["forwarder_starts"]) for s in summaries.values()]),
        ("store lookups (local misses)", [store(s, "lookups") for s in summaries.values()]),
        ("  found in the store", [store(s, "lookup_hits") for s in summaries.values()]),
        ("  Maglev fallbacks", [store(s, "fallbacks") for s in summaries.values()]),
        ("client process paused (s)", [str(s["client_paused_s"]) for s in summaries.values()]),
    ]
    width = max(len(label) for label, _ in rows) + 2
    col = max(10, *(len(m) + 2 for m in modes))
    lines = [" " * width + "".join(f"{m:>{col}}" for m in modes)]
    lines.append("-" * (width + col * len(modes)))
    lines += [f"{label:<{width}}" + "".join(f"{v:>{col}}" for v in vals) for label, vals in rows]
    return "\n".join(lines)


def _alive_series(run: ModeRun, times: list[float]) -> tuple[list[int], list[int], list[int]]:
    tcp = [f for f in run.flows if f["kind"] == "tcp"]
    alive, reset, stalled = [], [], []
    for t in times:
        abs_t = run.t0 + t
        alive.append(
            sum(
                1
                for f in tcp
                if f["established"] is not None
                and f["established"] <= abs_t
                and (f["end"] is None or f["end"] > abs_t or f["status"] == "completed")
            )
        )
        reset.append(sum(1 for f in tcp if f["status"] == "reset" and f["end"] <= abs_t))
        stalled.append(sum(1 for f in tcp if f["status"] == "stalled" and f["end"] <= abs_t))
    return alive, reset, stalled


def plot_timeline(path: Path, runs: list[ModeRun]) -> bool:
    """The PNG: per mode, connections alive/reset/stalled over time under the route moves and
    backend changes, with the POP carrying the VIP as a coloured band. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 3.2 * len(runs)), squeeze=False)
    pops = sorted({pop for run in runs for _t, pop in run.routes if pop is not None})
    colour = {pop: POP_COLOURS[i % len(POP_COLOURS)] for i, pop in enumerate(pops)}
    for ax, run in zip(axes[:, 0], runs, strict=True):
        span = run.t_end - run.t0
        times = [span * i / 400 for i in range(401)]
        alive, reset, stalled = _alive_series(run, times)
        routes = [(t - run.t0, pop) for t, pop in run.routes if t <= run.t_end]
        for i, (t, pop) in enumerate(routes):
            until = routes[i + 1][0] if i + 1 < len(routes) else span
            if pop is not None:
                ax.axvspan(max(t, 0), until, color=colour[pop], alpha=0.12, lw=0)
        ax.plot(times, alive, color="black", lw=1.6, label="TCP connections alive")
        ax.plot(times, reset, color="tab:red", lw=1.6, label="reset (cumulative)")
        ax.plot(times, stalled, color="tab:purple", lw=1.2, ls="--", label="stalled (cumulative)")
        top = max(1, sum(f["kind"] == "tcp" for f in run.flows))
        for event in run.events:
            style = EVENT_STYLE.get(event.kind)
            if style is None:
                continue
            x = event.t - run.t0
            ax.axvline(x, color=style[0], ls=style[1], lw=1)
            ax.text(x, top * 1.02, event.label, rotation=30, fontsize=7, va="bottom", ha="left")
        tcp = [f for f in run.flows if f["kind"] == "tcp"]
        counts = Counter(f["status"] for f in tcp)
        ax.text(
            0.99,
            0.06,
            f"{counts['completed']} completed · {counts['reset']} reset · "
            f"{counts['stalled']} stalled",
            transform=ax.transAxes,
            ha="right",
            fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
        )
        ax.set_xlim(0, span)
        ax.set_ylim(0, top * 1.08)
        ax.set_ylabel(run.mode, fontsize=11, fontweight="bold")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    from matplotlib.patches import Patch

    handles += [Patch(color=colour[p], alpha=0.3) for p in pops]
    labels += [f"VIP routed to {p}" for p in pops]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the connections opened")
    fig.suptitle("flowstate lab: connections through BGP route moves and backend changes")
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
