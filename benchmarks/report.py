"""Turn `Report`s into a terminal table, a Markdown file, one JSON file and PNG plots."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.framework import Report


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def human(report: Report) -> str:
    out = [f"== {report.name}", text_table(report.headers, report.rows)]
    out += [f"  {n}" for n in report.notes]
    return "\n".join(out)


def markdown(reports: Sequence[Report], errors: dict[str, str]) -> str:
    out = [
        "# flowstate benchmarks",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {platform.node()}, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
    ]
    for r in reports:
        out += ["", f"## {r.name}", ""]
        out.append("| " + " | ".join(r.headers) + " |")
        out.append("|" + "|".join("---" for _ in r.headers) + "|")
        out += ["| " + " | ".join(row) + " |" for row in r.rows]
        out.append("")
        out += [f"- {n}" for n in r.notes]
    for name, err in errors.items():
        out += ["", f"## {name}", "", f"failed: {err}"]
    return "\n".join(out) + "\n"


def json_document(reports: Sequence[Report], errors: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = {r.name: r.data for r in reports}
    for name, err in errors.items():
        doc[name] = {"error": err}
    return doc


def write_outputs(
    out: Path, reports: Sequence[Report], errors: dict[str, str]
) -> tuple[list[Path], str | None]:
    """results.json, results.md and each report's plots in `out`; returns (paths, note) where
    note says why plots were skipped, if they were."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(json_document(reports, errors), indent=2) + "\n")
    paths[1].write_text(markdown(reports, errors))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths, "plots skipped: matplotlib is not installed"
    for r in reports:
        if r.plot is not None:
            paths += r.plot(plt, out)
    return paths, None
