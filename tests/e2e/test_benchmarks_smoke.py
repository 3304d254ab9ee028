"""Smoke test of the benchmark harness: `python -m benchmarks run --only fastpath --json` with
tiny durations runs the whole lab (namespaces, pktgen, the real daemon in C and Python, the
kernel peer) and prints one JSON object of the documented shape. No timing is asserted: only
that every measured number is there, and positive (the saturated rates may be 0: a forwarder
that shares its CPU with its receive softirq can collapse under overload, which is a result).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import require_netns

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PEERS = {"kernel", "c", "python", "c_2workers"}  # the --quick peers
SIZES = {"64", "1400"}
STATS = {"median", "min", "max", "samples"}


def numbers(node: Any, path: str = "") -> list[tuple[str, float]]:
    """Every int/float in a JSON tree (booleans are not numbers here), with its path."""
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return []
    if isinstance(node, int | float):
        return [(path, node)]
    if isinstance(node, dict):
        return [n for k, v in node.items() for n in numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [n for i, v in enumerate(node) for n in numbers(v, f"{path}[{i}]")]
    raise AssertionError(f"{path}: unexpected JSON value {node!r}")


def run_benchmarks(*args: str) -> tuple[Any, str]:
    """`python -m benchmarks run --quick --json ARGS` in the repository: (its JSON, its stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--json", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout), proc.stderr


def test_fastpath_benchmark_runs_and_reports_positive_rates() -> None:
    require_netns()
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build benchmarks/pktgen.c")
    doc, stderr = run_benchmarks("--only", "fastpath", "--seconds", "0.3", "--rounds", "1")
    assert set(doc) == {"fastpath"}
    fp = doc["fastpath"]
    for key in ("pps", "saturation_pps", "generator_pps"):
        assert set(fp[key]) == PEERS, key
        for peer, by_size in fp[key].items():
            assert set(by_size) == SIZES, (key, peer)
            for stats in by_size.values():
                assert set(stats) == STATS
                assert len(stats["samples"]) == 1
    for size in SIZES:
        assert {"c_vs_kernel", "c_vs_python", "c_2workers_vs_c"} <= set(fp["ratios"][size])
    ratios = {
        s: {k: v for k, v in r.items() if "saturation" not in k} for s, r in fp["ratios"].items()
    }
    measured = {"pps": fp["pps"], "generator_pps": fp["generator_pps"], "ratios": ratios}
    measured["top"] = [fp["ratio_c_vs_kernel"], fp["ratio_c_vs_python"]]
    found = numbers(measured)
    assert len(found) > 40
    bad = [(path, value) for path, value in found if not value > 0]
    assert not bad, f"non-positive measurements: {bad}"
    saturated = numbers({"saturation_pps": fp["saturation_pps"]})
    assert saturated and all(value >= 0 for _, value in saturated)
    # The progress lines (one per step, with an ETA) go to stderr.
    assert "ETA" in stderr
