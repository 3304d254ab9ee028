"""Smoke test of the recovery and latency benchmarks: `python -m benchmarks run --only
recovery,latency --json` with tiny sizes builds both labs (a Redis Cluster in a namespace,
the real daemons, the timestamped captures, pingpong.c) and prints the documented fields.
No timing is asserted: only that every figure is there and positive.
"""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.conftest import require_netns
from tests.e2e.test_benchmarks_smoke import numbers, run_benchmarks

pytestmark = pytest.mark.e2e


def test_recovery_and_latency_benchmarks_report_positive_figures() -> None:
    require_netns()
    for tool in ("gcc", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed by the recovery and latency benchmarks")
    doc, stderr = run_benchmarks("--only", "recovery,latency", "--seconds", "0.1", "--rounds", "1")
    assert set(doc) == {"recovery", "latency"}
    rec, lat = doc["recovery"], doc["latency"]
    for key in ("recovery_p50_us", "recovery_p99_us", "store_get_p50_us", "store_get_p99_us"):
        assert set(rec[key]) == {"median", "min", "max", "samples"}
        assert len(rec[key]["samples"]) == 1
    assert rec["followed_record_share"] > 0
    assert set(lat["p50_us"]) == {"direct", "routed", "flowstate_c", "flowstate_python"}
    measured = {
        "recovery": [rec[k] for k in ("recovery_p50_us", "recovery_p99_us", "in_table_p50_us")],
        "get": [rec["store_get_p50_us"], rec["ratio_p99"], rec["ratio_p50"]],
        "latency": [lat["p50_us"], lat["p99_us"], lat["ratio_p50"], lat["ratio_p99"]],
    }
    found = numbers(measured)
    assert len(found) > 30
    bad = [(path, value) for path, value in found if not value > 0]
    assert not bad, f"non-positive measurements: {bad}"
    assert "ETA" in stderr
