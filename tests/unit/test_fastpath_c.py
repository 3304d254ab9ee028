"""C-specific tests of `forwarder._fastpath`: the inlined hash, the slot layout, fixed memory,
leaks, argument checks, and differential runs against the Python reference engine.

The same tests (and the golden table) also run against the AddressSanitizer/UBSan build:

    FLOWSTATE_ASAN=1 python setup.py build_ext --inplace --force
    PYTHONMALLOC=malloc LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        FLOWSTATE_REQUIRE_C=1 python -m pytest -p no:cacheprovider \
        tests/unit/test_fastpath_c.py tests/unit/test_golden.py tests/fuzz
    python setup.py build_ext --inplace --force   # back to the optimised build

(Do it in a copy of the tree when others share it: the in-place ASan module does not import
without the LD_PRELOAD. `PYTHONMALLOC=malloc` gives every bytes object its own heap block, so
ASan sees a read past a frame's end; `detect_leaks=0`: CPython itself does not free everything at
exit, leaks of the extension are checked here with tracemalloc instead.)
"""

from __future__ import annotations

import errno
import gc
import os
import random
import resource
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any, cast

import mmh3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowstate.flow import CLUSTER_SLOTS, HASH_SEED, FiveTuple, Proto, key_slot
from flowstate.store._codec import group_by_node_py
from forwarder.fastpath import c_engine_available, load_engine
from forwarder.packet import (
    TCP_ACK,
    TCP_SYN,
    TP_STATUS_CSUMNOTREADY,
    frame,
    ipv4,
    ipv6,
    tcp,
    udp,
)
from tests.golden_packets import (
    CASES,
    T0,
    VIP4,
    VIP6,
    GoldenCase,
    Process,
    golden_engine,
    normalised,
)

if not c_engine_available():
    if os.environ.get("FLOWSTATE_REQUIRE_C") == "1":
        raise RuntimeError("FLOWSTATE_REQUIRE_C=1 but forwarder._fastpath has no Engine")
    pytest.skip("forwarder._fastpath is not built (pip install -e .)", allow_module_level=True)

from forwarder import _fastpath

CEngine: Any = load_engine("c")
PyEngine: Any = load_engine("python")
SINGLE = [c for c in CASES if c.single]
DIFF = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


#: RSS bounds mean nothing under AddressSanitizer (shadow memory, quarantine).
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def syn4(client_port: int, client: bytes = bytes([198, 51, 100, 7])) -> bytes:
    return frame(ipv4(client, VIP4, tcp(client, VIP4, client_port, 80, flags=TCP_SYN), proto=6))


# --- the inlined MurmurHash3 ---------------------------------------------------------------------


def test_hash_bytes_matches_mmh3_on_every_tail_length() -> None:
    rng = random.Random(7)
    for length in range(0, 200):
        for _ in range(5):
            data = rng.randbytes(length)
            seed = rng.choice((0, HASH_SEED, rng.getrandbits(32)))
            assert _fastpath.hash_bytes(data, seed) == mmh3.hash_bytes(data, seed), (length, seed)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_hash_bytes_matches_mmh3(data: bytes, seed: int) -> None:
    assert _fastpath.hash_bytes(data, seed) == mmh3.hash_bytes(data, seed)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4, max_size=4), st.integers(0, 0xFFFF), st.sampled_from([6, 17]))
def test_engine_hash_is_the_flow_hash(client: bytes, client_port: int, proto: int) -> None:
    """The flow label of a forwarded packet carries bits 32..51 of `FiveTuple.hash64()`."""
    engine = golden_engine(CEngine)
    if proto == 6:
        l4 = tcp(client, VIP4, client_port, 80, flags=TCP_SYN)
        vport = 80
    else:
        vport = 53
        l4 = udp(client, VIP4, client_port, vport, b"q")
    result = engine.process([frame(ipv4(client, VIP4, l4, proto=proto))], T0)
    if result.verdicts != b"\x01":
        return  # this golden set-up has no such UDP service: nothing to compare
    h = FiveTuple(Proto(proto), client, client_port, VIP4, vport).hash64()
    assert int.from_bytes(result.tx[0][1][:4], "big") & 0xFFFFF == (h >> 32) & 0xFFFFF


# --- layout and fixed memory ---------------------------------------------------------------------


def test_slot_is_48_bytes() -> None:
    assert CEngine.entry_size == 48
    assert _fastpath.ENTRY_SIZE == 48


@pytest.mark.parametrize("capacity", [0, -1, _fastpath.MAX_CAPACITY + 1, 2**64])
def test_capacity_out_of_bounds(capacity: int) -> None:
    with pytest.raises(ValueError):
        make_engine(capacity=capacity)


def make_engine(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "source_ipv6": bytes(15) + b"\x01",
        "capacity": 1024,
        "tcp_idle_ms": 60_000,
        "udp_idle_ms": 30_000,
        "fin_linger_ms": 1_000,
        "touch_interval_ms": 10_000,
    }
    kwargs.update(overrides)
    return CEngine(**kwargs)


def configured(capacity: int) -> Any:
    engine = make_engine(capacity=capacity)
    engine.set_vip(0, VIP4, 80, 6)
    engine.set_backend(1, bytes(15) + b"\xb1")
    engine.set_maglev(0, bytes([1, 0]) * 13)
    return engine


def test_largest_table_is_reserved_not_touched() -> None:
    before = rss_bytes()
    engine = make_engine(capacity=_fastpath.MAX_CAPACITY)
    assert engine.capacity == _fastpath.MAX_CAPACITY
    assert engine.counters()["capacity"] == _fastpath.MAX_CAPACITY
    # 1 GiB of slots is mapped once; pages are only faulted in as flows land in them.
    if not UNDER_ASAN:
        assert rss_bytes() - before < 64 << 20
    del engine


def huge_advised_mappings() -> set[tuple[int, int]]:
    """(start, end) of this process's mappings madvise(MADV_HUGEPAGE)d (VmFlags "hg")."""
    found: set[tuple[int, int]] = set()
    span: tuple[int, int] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = head.split("-")
                span = (int(start, 16), int(end, 16))
            elif head == "VmFlags:" and span is not None and "hg" in line.split()[1:]:
                found.add(span)
    return found


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"), reason="kernel without THP"
)
def test_table_of_huge_pages_is_aligned_advised_and_unmapped() -> None:
    hpage = 2 << 20
    small = make_engine(capacity=1024)  # 48 KiB: no huge page fits, left alone
    assert (small.counters()["table_hugepages"], small.counters()["table_madvise_errno"]) == (0, 0)
    before = huge_advised_mappings()
    capacity = 65536 + 8  # 3 MiB and a bit: one aligned huge page and a 4 KiB tail
    engine = make_engine(capacity=capacity)
    counters = engine.counters()
    assert (counters["table_hugepages"], counters["table_madvise_errno"]) == (1, 0)
    assert engine.capacity == counters["capacity"] == capacity
    table = huge_advised_mappings() - before
    assert len(table) == 1
    ((start, end),) = table
    assert start % hpage == 0
    assert end - start == -(-capacity * 48 // resource.getpagesize()) * resource.getpagesize()
    del engine
    gc.collect()
    assert not huge_advised_mappings() - before  # munmap'd


def test_full_table_evicts_and_never_grows() -> None:
    engine = configured(capacity=4096)
    before = rss_bytes()
    for start in range(0, 40_000, 500):
        frames = [
            syn4(1024 + (start + i) % 60000, bytes([10, 0, i % 256, start % 251]))
            for i in range(500)
        ]
        result = engine.process(frames, T0 + start)
        assert set(result.verdicts) == {1}
    counters = engine.counters()
    assert len(engine) == counters["flows"] <= 4096
    assert counters["evicted"] > 0
    assert counters["new"] == 40_000
    if not UNDER_ASAN:
        assert rss_bytes() - before < 16 << 20


# --- leaks ---------------------------------------------------------------------------------------


def mixed_batch(i: int) -> tuple[list[bytes], list[int]]:
    """Frames that go through every output path: NEW, FORWARD, MISS, REPLY, drops, events."""
    client = bytes([203, 0, 113, i % 200])
    big = ipv4(
        client, VIP4, tcp(client, VIP4, 2000, 80, flags=TCP_ACK, payload=bytes(1500)), proto=6
    )
    frames = [
        syn4(3000 + i, client),
        frame(ipv4(client, VIP4, tcp(client, VIP4, 3000 + i, 80, flags=TCP_ACK), proto=6)),
        frame(ipv4(client, VIP4, tcp(client, VIP4, 9, 80, flags=TCP_ACK, partial=True), proto=6)),
        frame(big),
        frame(ipv6(bytes(16), VIP6, b"", nh=59)),
        b"\x00" * 9,
    ]
    statuses = [0, 0, TP_STATUS_CSUMNOTREADY, 0, 0, 0]
    return frames, statuses


def test_no_leak_over_many_batches() -> None:
    engine = configured(capacity=512)
    frames, statuses = mixed_batch(0)
    refs = [sys.getrefcount(f) for f in frames]
    for i in range(50):
        batch, batch_statuses = mixed_batch(i)
        result = engine.process(batch, T0 + i, batch_statuses)
    del result
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(2000):
            batch, batch_statuses = mixed_batch(50 + i)
            result = engine.process(batch, T0 + 50 + i, batch_statuses)
            assert result.misses and result.events and result.tx
            engine.expire(T0 + 50 + i, 64)
            engine.counters()
        del result, batch, batch_statuses
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown - base < 64 * 1024, f"{grown - base} bytes kept after 2000 batches"
    result = engine.process(frames, T0 + 5000, statuses)
    del result
    assert [sys.getrefcount(f) for f in frames] == refs


def test_miss_frame_is_the_input_object_when_unchanged() -> None:
    engine = configured(capacity=64)
    client = bytes([203, 0, 113, 9])
    ack = frame(ipv4(client, VIP4, tcp(client, VIP4, 5, 80, flags=TCP_ACK), proto=6))
    result = engine.process([ack], T0)
    assert result.misses[0][2] is ack
    result = engine.process([bytearray(ack)], T0)
    assert type(result.misses[0][2]) is bytes and result.misses[0][2] == ack


# --- argument checks -----------------------------------------------------------------------------

BAD_CALLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("process(None)", lambda e: e.process(None, 0)),
    ("process(int frames)", lambda e: e.process([1, 2], 0)),
    ("process(str frame)", lambda e: e.process(["abc"], 0)),
    ("process(now str)", lambda e: e.process([], "0")),
    ("process(now < 0)", lambda e: e.process([], -1)),
    ("process(statuses len)", lambda e: e.process([b"x"], 0, [])),
    ("process(statuses type)", lambda e: e.process([b"x"], 0, ["a"])),
    ("process(statuses range)", lambda e: e.process([b"x"], 0, [2**40])),
    ("process(statuses iter)", lambda e: e.process([b"x"], 0, 5)),
    ("set_vip(id)", lambda e: e.set_vip(256, VIP4, 80, 6)),
    ("set_vip(ip)", lambda e: e.set_vip(1, b"123", 80, 6)),
    ("set_vip(ip str)", lambda e: e.set_vip(1, "192.0.2.1", 80, 6)),
    ("set_vip(proto)", lambda e: e.set_vip(1, VIP4, 80, 1)),
    ("set_vip(port)", lambda e: e.set_vip(1, VIP4, 70000, 6)),
    ("set_vip(dup)", lambda e: e.set_vip(1, VIP4, 80, 6)),
    ("set_vip(missing)", lambda e: e.set_vip(1, VIP4)),
    ("set_backend(id)", lambda e: e.set_backend(65535, bytes(16))),
    ("set_backend(ip4)", lambda e: e.set_backend(2, VIP4)),
    ("set_backend(mac)", lambda e: e.set_backend(2, bytes(16), dst_mac=b"12345")),
    ("set_backend(ifindex)", lambda e: e.set_backend(2, bytes(16), ifindex=-1)),
    ("set_backend(positional mac)", lambda e: e.set_backend(2, bytes(16), b"123456")),
    ("set_maglev(odd)", lambda e: e.set_maglev(0, b"\x01")),
    ("set_maglev(type)", lambda e: e.set_maglev(0, [1, 2])),
    ("maglev_pick(hash<0)", lambda e: e.maglev_pick(0, -1)),
    ("maglev_pick(hash>64b)", lambda e: e.maglev_pick(0, 2**64)),
    ("install(flow)", lambda e: e.install((6, VIP4, 1), 1, 0)),
    ("install(flow types)", lambda e: e.install(("tcp", VIP4, 1, VIP4, 80), 1, 0)),
    ("install(mixed families)", lambda e: e.install((6, bytes(16), 1, VIP4, 80), 1, 0)),
    ("install(no vip)", lambda e: e.install((6, VIP4, 1, VIP4, 81), 1, 0)),
    ("install(no backend)", lambda e: e.install((6, VIP4, 1, VIP4, 80), 9, 0)),
    ("lookup(bytes)", lambda e: e.lookup(b"12345")),
    ("expire(budget<0)", lambda e: e.expire(0, -1)),
    ("remove_vip(str)", lambda e: e.remove_vip("0")),
    ("remove_backend(bool)", lambda e: e.remove_backend(True)),
    ("init(positional)", lambda e: CEngine(bytes(16))),
    ("init(missing)", lambda e: CEngine(source_ipv6=bytes(16))),
    ("init(tunnel_mtu)", lambda e: make_engine(tunnel_mtu=1279)),
    ("init(idle)", lambda e: make_engine(tcp_idle_ms=2**31)),
    ("init(source)", lambda e: make_engine(source_ipv6=bytes(4))),
    ("hash_bytes(seed)", lambda e: _fastpath.hash_bytes(b"", 2**32)),
    ("hash_bytes(str)", lambda e: _fastpath.hash_bytes(cast(Any, "abc"))),
    ("flow_keys(int)", lambda e: e.flow_keys(5)),
    ("flow_keys(bad flow)", lambda e: e.flow_keys([(6, VIP4, 1, VIP4, 80), (6, b"", 1, b"", 80)])),
]


_key_st = st.one_of(
    st.binary(max_size=24),
    st.lists(st.sampled_from([b"{", b"}", b"a", b"\x00", b"fs1:"]), max_size=8).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_key_st, max_size=40), st.integers(0, 5), st.integers(0, 2**32))
def test_group_by_node_matches_python(keys: list[bytes], n_nodes: int, seed: int) -> None:
    """C `group_by_node` = the store's Python reference: slots (hash tags included) and groups."""
    rnd = random.Random(seed)
    slot_node = [rnd.randrange(-1, n_nodes) for _ in range(CLUSTER_SLOTS)]
    got = _fastpath.group_by_node(keys, slot_node, n_nodes)
    assert got == group_by_node_py(keys, slot_node, n_nodes)
    for g, idxs in enumerate(got):
        for i in idxs:
            assert slot_node[key_slot(keys[i])] == (g if g < n_nodes else -1)


@pytest.mark.parametrize(
    ("keys", "slot_node", "n_nodes", "error"),
    [
        ([b"a", "b"], [0] * CLUSTER_SLOTS, 1, TypeError),  # a key that is not bytes
        ([b"a"], [0] * 10, 1, IndexError),  # slot map too short
        ([b"a"], [5] * CLUSTER_SLOTS, 1, IndexError),  # node index out of range
        ([b"a"], ["0"] * CLUSTER_SLOTS, 1, TypeError),
        ([b"a"], [0] * CLUSTER_SLOTS, -1, ValueError),
        (5, [0] * CLUSTER_SLOTS, 1, TypeError),
    ],
)
def test_group_by_node_bad_input_raises_like_python(
    keys: Any, slot_node: Any, n_nodes: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        _fastpath.group_by_node(keys, slot_node, n_nodes)
    if n_nodes >= 0:
        with pytest.raises(error):
            group_by_node_py(keys, slot_node, n_nodes)


def test_group_by_node_frees_what_it_built() -> None:
    keys = [os.urandom(20) for _ in range(256)]
    good = [s % 3 for s in range(CLUSTER_SLOTS)]
    refs = [sys.getrefcount(k) for k in keys]
    _fastpath.group_by_node(keys, good, 3)
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(500):
            _fastpath.group_by_node(keys, good, 3)
            with pytest.raises(TypeError):
                _fastpath.group_by_node([*keys, "not bytes"], good, 3)
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown - base < 64 * 1024, f"{grown - base} bytes kept after 500 calls"
    assert [sys.getrefcount(k) for k in keys] == refs


def test_flow_keys_keep_no_reference_and_free_what_they_built() -> None:
    """Keys are new bytes (KEY_PREFIX + digest); a bad flow in the middle raises and leaks
    none of the keys built before it; nothing of the input is kept."""
    engine = configured(capacity=64)
    flows = [(6, os.urandom(4), i, VIP4, 80) for i in range(64)]
    refs = [sys.getrefcount(f) for f in flows]
    assert engine.flow_keys(flows) == [FiveTuple(Proto.TCP, *f[1:]).key() for f in flows]
    bad = [*flows[:10], (6, b"x", 1, VIP4, 80), *flows[10:]]
    engine.flow_keys(flows)
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(2000):
            engine.flow_keys(flows)
            with pytest.raises(ValueError):
                engine.flow_keys(bad)
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown - base < 64 * 1024, f"{grown - base} bytes kept after 2000 calls"
    del bad
    assert [sys.getrefcount(f) for f in flows] == refs


@pytest.mark.parametrize("call", [c for _, c in BAD_CALLS], ids=[n for n, _ in BAD_CALLS])
def test_bad_arguments_raise(call: Callable[[Any], Any]) -> None:
    engine = configured(capacity=64)
    engine.set_vip(0, VIP4, 80, 6)
    with pytest.raises((TypeError, ValueError)):
        call(engine)
    # The engine is still usable afterwards.
    assert engine.process([syn4(1)], T0).verdicts == b"\x01"


def test_backend_link() -> None:
    engine = configured(capacity=64)
    assert engine.backend_link(1) is None  # no link info
    assert engine.backend_link(2) is None  # no such backend
    engine.set_backend(1, bytes(16), dst_mac=b"\x02" * 6, src_mac=b"\x04" * 6, ifindex=3, mtu=1400)
    assert engine.backend_link(1) == (3, b"\x04" * 6, b"\x02" * 6, 1400)
    engine.set_backend(1, bytes(16), dst_mac=b"\x02" * 6, ifindex=3)
    assert engine.backend_link(1) is None  # incomplete: no source MAC


def test_uninitialised_engine_raises() -> None:
    engine = CEngine.__new__(CEngine)
    with pytest.raises(RuntimeError):
        engine.process([], 0)
    assert len(engine) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bpf": b"1234567"},
        {"block_size": 1000},
        {"frame_size": 24},
        {"frame_size": 3000},
        {"block_count": 0},
        {"fanout_group": 70000},
    ],
)
def test_ring_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _fastpath.PacketRing("lo", **kwargs)


def test_ring_unknown_interface() -> None:
    with pytest.raises(OSError) as info:
        _fastpath.PacketRing("fs-no-such-if0")
    assert info.value.errno == errno.ENODEV


# --- differential: C against the Python reference ------------------------------------------------


def run_setup(engine: Any, case: GoldenCase) -> None:
    for step in case.setup:
        if isinstance(step, Process):
            engine.process(list(step.frames), step.now_ms, step.statuses)
        else:
            getattr(engine, step.method)(*step.args)


@DIFF
@given(
    st.sampled_from(SINGLE),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
    st.integers(0, 1 << 16),
    st.sampled_from([0, TP_STATUS_CSUMNOTREADY]),
    st.integers(0, 3),
)
def test_c_matches_python_on_mutated_golden_frames(
    case: GoldenCase, edits: list[tuple[int, int]], cut: int, status: int, later_ms: int
) -> None:
    engines = [golden_engine(CEngine), golden_engine(PyEngine)]
    for engine in engines:
        run_setup(engine, case)
    mutated = bytearray(case.frame)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    frames = [bytes(mutated), bytes(mutated[: cut % (len(mutated) + 1)]), case.frame]
    now = case.now_ms + later_ms
    c, py = (normalised(e.process(frames, now, [status] * 3)) for e in engines)
    assert c == py
    assert {k: v for k, v in engines[0].counters().items() if k in engines[1].counters()} == (
        engines[1].counters()
    )
    assert len(engines[0]) == len(engines[1])
    assert engines[0].expire(now + 10**7, 1000) == engines[1].expire(now + 10**7, 1000)


def test_c_matches_python_on_every_truncation_with_csum_status() -> None:
    for case in SINGLE:
        for status in (0, TP_STATUS_CSUMNOTREADY):
            engines = [golden_engine(CEngine), golden_engine(PyEngine)]
            for engine in engines:
                run_setup(engine, case)
            frames = [case.frame[:n] for n in range(len(case.frame) + 1)]
            c, py = (
                normalised(e.process(frames, case.now_ms, [status] * len(frames))) for e in engines
            )
            assert c == py, case.description
