"""The golden packet table against every data-path impl (C and Python), whole and truncated,
plus fuzzing (random and mutated frames never raise) and the engine's argument checks.

The C impl is skipped while `forwarder._fastpath` has no `Engine`, unless FLOWSTATE_REQUIRE_C=1.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowstate.errors import UsageError
from flowstate.flow import FiveTuple, Proto
from forwarder.fastpath import REPLY, Event, Verdict, c_engine_available, load_engine
from forwarder.packet import (
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MISS_ICMP,
    MISS_PACKET,
    TCP_SYN,
    eth,
    frame,
    ipv4,
    ipv6,
    tcp,
    udp,
    vlan,
)
from tests.golden_packets import (
    BACKENDS,
    CAPACITY,
    CASES,
    SOURCE,
    T0,
    TABLES,
    VIP4,
    VIP6,
    VIPS,
    Call,
    GoldenCase,
    Process,
    Step,
    golden_engine,
    normalised,
)

SINGLE = [c for c in CASES if c.single]
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(params=["python", "c"])
def engine_cls(request: pytest.FixtureRequest) -> Any:
    impl: str = request.param
    if impl == "c" and not c_engine_available():
        reason = "forwarder._fastpath has no Engine yet (build it: pip install -e .)"
        if os.environ.get("FLOWSTATE_REQUIRE_C") == "1":
            pytest.fail(f"FLOWSTATE_REQUIRE_C=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return load_engine(impl)


# --- comparing results ---------------------------------------------------------------------------


def first_difference(got: bytes, want: bytes) -> str:
    """Where two byte strings part, for a readable assertion message."""
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"byte {i}: got {got[i : i + 8].hex()} want {want[i : i + 8].hex()}"
    return f"length: got {len(got)} want {len(want)}"


def names(verdicts: Sequence[int]) -> list[str]:
    return [Verdict(v).name if v in Verdict._value2member_map_ else str(v) for v in verdicts]


def check_items(what: str, got: Sequence[tuple[Any, ...]], want: Sequence[tuple[Any, ...]]) -> None:
    got_n = [tuple(x) for x in got]
    want_n = [tuple(x) for x in want]
    assert len(got_n) == len(want_n), f"{what}: got {len(got_n)} items, want {len(want_n)}"
    for i, (g, w) in enumerate(zip(got_n, want_n, strict=True)):
        for j, (a, b) in enumerate(zip(g, w, strict=True)):
            if isinstance(b, bytes):
                assert bytes(a) == b, f"{what}[{i}][{j}] {first_difference(bytes(a), b)}"
            elif isinstance(b, tuple):
                assert tuple(a) == b, f"{what}[{i}][{j}]: got {a!r} want {b!r}"
            else:
                assert int(a) == int(b), f"{what}[{i}][{j}]: got {a!r} want {b!r}"


def run_frames(engine: Any, step: Process, frames: list[bytes], statuses: list[int] | None) -> Any:
    """`process` the frames as `step` says, or `forward_to` them when the step is one."""
    if step.forward_to is not None:
        assert statuses is None, "forward_to takes no statuses"
        return engine.forward_to(frames, step.forward_to)
    return engine.process(frames, step.now_ms, statuses)


def run_step(engine: Any, step: Step, tally: Counter[int], where: str) -> Any:
    if isinstance(step, Call):
        got = getattr(engine, step.method)(*step.args, **step.kwargs)
        if isinstance(step.returns, list):
            got = [tuple(x) for x in got]
        assert got == step.returns, f"{where}: {step.method}{step.args!r}"
        return got
    statuses = list(step.statuses) if step.statuses is not None else None
    result = run_frames(engine, step, list(step.frames), statuses)
    verdicts = bytes(result.verdicts)
    assert names(verdicts) == names(step.verdicts), where
    check_items(f"{where} tx", result.tx, step.tx)
    check_items(f"{where} misses", result.misses, step.misses)
    check_items(f"{where} events", result.events, step.events)
    tally.update(verdicts)
    return result


def run_case(engine: Any, case: GoldenCase) -> Counter[int]:
    tally: Counter[int] = Counter()
    for i, step in enumerate(case.setup):
        run_step(engine, step, tally, f"setup[{i}]")
    run_step(engine, case.main, tally, "main")
    for i, step in enumerate(case.after):
        run_step(engine, step, tally, f"after[{i}]")
    return tally


# --- the golden table ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_golden(engine_cls: Any, case: GoldenCase) -> None:
    engine = golden_engine(engine_cls)
    tally = run_case(engine, case)
    counters = engine.counters()
    for v in Verdict:
        assert counters[v.name.lower()] == tally[v], v.name
    assert counters["flows"] == len(engine)
    assert counters["capacity"] == CAPACITY
    for key, value in case.stats.items():
        assert counters[key] == value, key
    for key in ("evicted", "expired"):
        if key not in case.stats:
            assert counters[key] == 0, key


def l3_end(f: bytes) -> int:
    """Where the frame's meaningful bytes end (Ethernet padding excluded), as far as its own
    headers say; shorter frames can never be valid."""
    off = 14
    for _ in range(2):
        if f[off - 2 : off] not in (b"\x81\x00", b"\x88\xa8"):
            break
        off += 4
    kind = f[off - 2 : off]
    if kind == b"\x08\x00" and len(f) >= off + 4:
        return off + int.from_bytes(f[off + 2 : off + 4], "big")
    if kind == b"\x86\xdd" and len(f) >= off + 6:
        return off + 40 + int.from_bytes(f[off + 4 : off + 6], "big")
    return min(off, len(f))


def is_drop_or_pass(v: int) -> bool:
    return Verdict(v).is_drop or Verdict(v).is_pass


@pytest.mark.parametrize("case", SINGLE, ids=[c.description for c in SINGLE])
def test_golden_truncated(engine_cls: Any, case: GoldenCase) -> None:
    """Every prefix of the frame is a DROP or a PASS with no output (padding aside)."""
    full, end = case.frame, l3_end(case.frame)
    engine = golden_engine(engine_cls)
    tally: Counter[int] = Counter()
    for i, step in enumerate(case.setup):
        run_step(engine, step, tally, f"setup[{i}]")
    flows = len(engine)
    short = [full[:n] for n in range(min(end, len(full)))]
    statuses = None if case.main.forward_to is not None else [case.status] * len(short)
    result = run_frames(engine, case.main, short, statuses)
    bad = [(n, v) for n, v in enumerate(bytes(result.verdicts)) if not is_drop_or_pass(v)]
    assert not bad, f"truncated lengths with a non-DROP/PASS verdict: {bad[:5]}"
    assert not result.tx and not result.misses and not result.events
    assert len(engine) == flows
    for n in range(end, len(full)):  # only Ethernet padding is cut: same decision
        engine = golden_engine(engine_cls)
        for step in case.setup:
            run_step(engine, step, Counter(), "setup")
        status = None if case.main.forward_to is not None else [case.status]
        v = bytes(run_frames(engine, case.main, [full[:n]], status).verdicts)[0]
        if is_drop_or_pass(case.expected_verdict):
            assert is_drop_or_pass(v), n
        else:
            assert v == case.expected_verdict, n


def test_golden_table_covers_every_verdict() -> None:
    seen = {
        v
        for c in CASES
        for step in (*c.setup, c.main, *c.after)
        if isinstance(step, Process)
        for v in step.verdicts
    }
    # DROP_NO_ROUTE is decided by the ring's TX, never by `process`.
    assert set(Verdict) - seen == {Verdict.DROP_NO_ROUTE}


# --- fuzzing -------------------------------------------------------------------------------------

HEADS = [
    b"",
    eth(ETH_P_IP),
    eth(ETH_P_IPV6),
    eth(ETH_P_8021Q) + vlan(1, ETH_P_IP),
    eth(ETH_P_IP) + bytes.fromhex("45000028000040004006") + b"\x00\x00" + bytes(4) + VIP4,
    eth(ETH_P_IPV6) + bytes.fromhex("6000000000200640") + bytes(16) + VIP6,
]


def check_invariants(frames: list[bytes], result: Any) -> None:
    verdicts = bytes(result.verdicts)
    assert len(verdicts) == len(frames)
    for v in verdicts:
        Verdict(v)
    backend_ips = set(BACKENDS.values())
    for dest, packet in result.tx:
        packet = bytes(packet)
        if dest == REPLY:
            assert len(packet) <= 22 + 40 + 8 + 1232
            continue
        assert packet[0] >> 4 == 6 and packet[8:24] == SOURCE
        assert packet[24:40] in backend_ips
        assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
        assert len(packet) - 40 <= max(len(f) for f in frames)
    lengths = {len(f) for f in frames}
    for _vip, _flow, f, kind in result.misses:
        assert len(f) in lengths
        assert kind in (MISS_PACKET, MISS_ICMP)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(HEADS), st.binary(max_size=120), st.integers(0, 15)),
        min_size=1,
        max_size=8,
    )
)
def test_random_frames_never_raise(engine_cls: Any, items: list[tuple[bytes, bytes, int]]) -> None:
    engine = golden_engine(engine_cls)
    frames = [head + body for head, body, _ in items]
    result = engine.process(frames, T0, [s for _, _, s in items])
    check_invariants(frames, result)


@FUZZ
@given(
    st.sampled_from(SINGLE),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 1 << 16),
    st.binary(max_size=16),
)
def test_mutated_golden_frames_never_raise(
    engine_cls: Any, case: GoldenCase, edits: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    engine = golden_engine(engine_cls)
    for step in case.setup:
        run_step(engine, step, Counter(), "setup")
    mutated = bytearray(case.frame)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    frames = [bytes(mutated), bytes(mutated[: cut % (len(mutated) + 1)]) + tail]
    result = engine.process(frames, case.now_ms + 1, [case.status] * 2)
    check_invariants(frames, result)


# --- the flow hash: event flows and FiveTuple agree ----------------------------------------------


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from(sorted(VIPS)),
    st.binary(min_size=16, max_size=16),
    st.integers(1, 0xFFFF),
)
def test_event_flows_hash_to_the_maglev_slot_used(
    engine_cls: Any, vip_id: int, address: bytes, client_port: int
) -> None:
    vip_ip, vip_port, proto = VIPS[vip_id]
    client = address[: len(vip_ip)]
    if proto == IPPROTO_TCP:
        l4 = tcp(client, vip_ip, client_port, vip_port, flags=TCP_SYN)
    else:
        l4 = udp(client, vip_ip, client_port, vip_port, b"q")
    if len(vip_ip) == 4:
        packet = ipv4(client, vip_ip, l4, proto=proto)
    else:
        packet = ipv6(client, vip_ip, l4, nh=proto)
    engine = golden_engine(engine_cls)
    result = engine.process([frame(packet)], T0)
    assert bytes(result.verdicts) == bytes([Verdict.NEW])
    ((code, flow, backend_id),) = result.events
    assert code == Event.NEW
    h = FiveTuple(Proto(flow[0]), *flow[1:]).hash64()
    assert TABLES[vip_id][h % len(TABLES[vip_id])] == backend_id
    assert engine.maglev_pick(vip_id, h) == backend_id
    assert engine.flow_keys([flow]) == [FiveTuple(Proto(flow[0]), *flow[1:]).key()]
    ((dest, out),) = result.tx
    assert dest == backend_id
    assert struct.unpack_from("!I", out)[0] & 0xFFFFF == (h >> 32) & 0xFFFFF


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([IPPROTO_TCP, IPPROTO_UDP]),
            st.sampled_from([4, 16]),
            st.binary(min_size=32, max_size=32),
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFF),
        ),
        max_size=20,
    )
)
def test_flow_keys_are_the_store_keys(
    engine_cls: Any, specs: list[tuple[int, int, bytes, int, int]]
) -> None:
    """`flow_keys` of both engines: `FiveTuple.key()` of each flow, in order (the store's keys)."""
    flows = [(p, a[:n], cport, a[16 : 16 + n], vport) for p, n, a, cport, vport in specs]
    engine = golden_engine(engine_cls)
    want = [FiveTuple(Proto(f[0]), *f[1:]).key() for f in flows]
    assert engine.flow_keys(flows) == want
    assert engine.flow_keys(tuple(flows)) == want


# --- API -----------------------------------------------------------------------------------------


def test_result_fields_and_counter_names(engine_cls: Any) -> None:
    engine = golden_engine(engine_cls)
    result = engine.process([], T0)
    assert (bytes(result.verdicts), list(result.tx), list(result.misses), list(result.events)) == (
        b"",
        [],
        [],
        [],
    )
    counters = engine.counters()
    expected = {v.name.lower() for v in Verdict} | {"flows", "capacity", "evicted", "expired"}
    expected.add("forward_to")
    assert expected <= set(counters)
    assert len(engine) == 0


def test_c_slot_is_48_bytes() -> None:
    if not c_engine_available():
        pytest.skip("forwarder._fastpath has no Engine yet")
    assert load_engine("c").entry_size == 48  # DATAPATH.md "Flow table": the slot layout


def test_capacity_rounds_up_to_buckets(engine_cls: Any) -> None:
    engine = engine_cls(
        source_ipv6=SOURCE,
        capacity=9,
        tcp_idle_ms=1,
        udp_idle_ms=1,
        fin_linger_ms=1,
        touch_interval_ms=1,
    )
    assert engine.counters()["capacity"] == 16


GOOD = {
    "source_ipv6": SOURCE,
    "capacity": 64,
    "tcp_idle_ms": 1,
    "udp_idle_ms": 1,
    "fin_linger_ms": 1,
    "touch_interval_ms": 1,
}


@pytest.mark.parametrize(
    "override",
    [
        {"source_ipv6": b"\x00" * 4},
        {"capacity": 0},
        {"capacity": (1 << 24) + 1},
        {"tcp_idle_ms": -1},
        {"fin_linger_ms": 1 << 31},
        {"tunnel_mtu": 1279},
        {"tunnel_mtu": 65536},
    ],
    ids=repr,
)
def test_bad_engine_arguments(engine_cls: Any, override: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        engine_cls(**{**GOOD, **override})


FLOW = (IPPROTO_TCP, b"\x01\x02\x03\x04", 1000, VIP4, 80)


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("set_vip", (256, VIP4, 80, IPPROTO_TCP)),
        ("set_vip", (5, b"\x01\x02\x03", 80, IPPROTO_TCP)),
        ("set_vip", (5, VIP4, 65536, IPPROTO_TCP)),
        ("set_vip", (5, VIP4, 80, 1)),
        ("set_vip", (5, VIP4, 80, IPPROTO_TCP)),  # vip 0 has this triple
        ("set_backend", (0xFFFF, BACKENDS[1])),
        ("set_backend", (4, VIP4)),
        ("set_maglev", (0, b"\x01\x00\x02")),
        ("set_maglev", (256, b"")),
        ("remove_vip", (-1,)),
        ("maglev_pick", (256, 0)),
        ("flow_keys", ([FLOW, (1, b"\x01\x02\x03\x04", 1000, VIP4, 80)],)),  # not tcp/udp
        ("flow_keys", ([(IPPROTO_UDP, b"\x01\x02\x03\x04", 1000, VIP6, 53)],)),  # families
        ("flow_keys", ([(IPPROTO_TCP, b"\x01\x02\x03\x04", 65536, VIP4, 80)],)),  # port
        ("flow_keys", ([(IPPROTO_TCP, b"\x01\x02\x03", 1000, b"\x01\x02\x03", 80)],)),
        ("flow_keys", ([FLOW[:4]],)),
        ("install", (FLOW, 7, T0)),  # unknown backend
        ("install", ((IPPROTO_TCP, b"\x01\x02\x03\x04", 1000, VIP4, 81), 1, T0)),  # no VIP
        ("install", ((IPPROTO_UDP, b"\x01\x02\x03\x04", 1000, VIP6, 53), 1, T0)),  # mixed families
        ("expire", (T0, -1)),
        ("forward_to", ([], -2)),
        ("forward_to", ([], 0xFFFF)),
    ],
    ids=repr,
)
def test_bad_calls(engine_cls: Any, method: str, args: tuple[Any, ...]) -> None:
    engine = golden_engine(engine_cls)
    with pytest.raises(ValueError):
        getattr(engine, method)(*args)


def test_bad_set_backend_mac(engine_cls: Any) -> None:
    with pytest.raises(ValueError):
        golden_engine(engine_cls).set_backend(4, BACKENDS[1], dst_mac=b"\x00" * 5)


def test_statuses_must_match_frames(engine_cls: Any) -> None:
    with pytest.raises(ValueError):
        golden_engine(engine_cls).process([b"", b""], T0, [0])


def test_set_vip_changing_triple_drops_old_flows(engine_cls: Any) -> None:
    engine = golden_engine(engine_cls)
    engine.install(FLOW, 1, T0)
    engine.set_vip(0, VIP4, 80, IPPROTO_TCP)  # same triple: nothing happens
    assert len(engine) == 1
    engine.set_vip(0, VIP4, 8080, IPPROTO_TCP)
    assert len(engine) == 0
    assert engine.lookup(FLOW) is None


def test_load_engine_names() -> None:
    assert load_engine("python").__module__ == "forwarder.pyengine"
    with pytest.raises(UsageError):
        load_engine("rust")


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(CASES),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
    st.integers(0, 1 << 16),
    st.integers(0, 15),
)
def test_c_and_python_agree_on_mutated_frames(
    case: GoldenCase, edits: list[tuple[int, int]], cut: int, status: int
) -> None:
    """Differential fuzzing: both impls give identical results and counters, frame by frame."""
    if not c_engine_available():
        if os.environ.get("FLOWSTATE_REQUIRE_C") == "1":
            pytest.fail("FLOWSTATE_REQUIRE_C=1 but forwarder._fastpath has no Engine")
        pytest.skip("forwarder._fastpath has no Engine yet")
    engines = [golden_engine(load_engine(impl)) for impl in ("python", "c")]
    for engine in engines:
        for step in case.setup:
            run_step(engine, step, Counter(), "setup")
    frames = []
    for f in case.main.frames[:4]:
        mutated = bytearray(f)
        for position, value in edits:
            mutated[position % len(mutated)] = value
        frames += [f, bytes(mutated), bytes(mutated[: cut % (len(mutated) + 1)])]
    py, c = (normalised(e.process(frames, case.now_ms, [status] * len(frames))) for e in engines)
    assert names(c[0]) == names(py[0])
    assert c == py
    assert engines[1].counters().items() >= engines[0].counters().items()
    assert len(engines[0]) == len(engines[1])
