"""Differential fuzz target: bytes -> a batch of frames -> the C engine and the Python reference.

Both engines get the golden set-up, run the batch twice (the first run pins flows, the second,
later, hits them: FORWARD, CLOSE, TOUCH, ICMP errors about known flows) and must return the same
verdicts, output bytes, misses, events and counters; after each run both also `forward_to` the
same frames to one backend (same output, no flow created). An odd clock step makes the UDP VIPs
lookup-first. Every output must also fit the input: a tunnelled packet is at most its frame, a
miss is one of the input frames.

Input encoding (so that mutations stay meaningful): one byte `n` (frames, 1..8), a byte of clock
step, then per frame a status byte (bit 0: TP_STATUS_CSUMNOTREADY), a 2-byte big-endian length
and that many bytes. A short input just gives fewer or shorter frames.
"""

from __future__ import annotations

import importlib
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from forwarder.fastpath import REPLY, TP_STATUS_CSUMNOTREADY, load_engine
from tests.golden_packets import CASES, T0, VIPS, golden_engine, normalised

MAX_FRAMES = 8


def encode(frames: Sequence[bytes], statuses: Sequence[int] = (), step: int = 1) -> bytes:
    """The fuzz input that decodes to these frames (the seed corpus is made with this)."""
    out = bytearray([len(frames), step & 0xFF])
    for i, f in enumerate(frames):
        status = statuses[i] if i < len(statuses) else 0
        out += bytes([1 if status & TP_STATUS_CSUMNOTREADY else 0]) + struct.pack("!H", len(f)) + f
    return bytes(out)


def decode(data: bytes) -> tuple[list[bytes], list[int], int]:
    if len(data) < 2:
        return [], [], 0
    n = max(1, min(data[0], MAX_FRAMES))
    step = data[1]
    frames: list[bytes] = []
    statuses: list[int] = []
    pos = 2
    while len(frames) < n and pos + 3 <= len(data):
        status = TP_STATUS_CSUMNOTREADY if data[pos] & 1 else 0
        (length,) = struct.unpack_from("!H", data, pos + 1)
        frames.append(data[pos + 3 : pos + 3 + length])
        statuses.append(status)
        pos += 3 + length
    return frames, statuses, step


def check_fits(frames: Sequence[bytes], result: Any) -> None:
    assert len(result.verdicts) == len(frames)
    longest = max((len(f) for f in frames), default=0)
    for dest, packet in result.tx:
        if dest == REPLY:
            assert len(packet) <= 1302  # Ethernet + 2 tags + 1280-byte IPv6 answer
        else:
            assert len(packet) - 40 <= longest
    for _vip, _flow, f, _kind in result.misses:
        assert len(f) in {len(x) for x in frames}


_C: Any = load_engine("c")
_PY: Any = load_engine("python")


def one_input(data: bytes) -> None:
    frames, statuses, step = decode(data)
    c, py = golden_engine(_C), golden_engine(_PY)
    if step & 1:  # odd clock steps: the UDP VIPs ask the store first (UDP misses, no NEW)
        for engine in (c, py):
            for vip_id, (ip, port, proto) in VIPS.items():
                if proto == 17:
                    engine.set_vip(vip_id, ip, port, proto, udp_lookup_first=True)
    for now in (T0, T0 + 1 + step * 1000):
        got = c.process(frames, now, statuses)
        check_fits(frames, got)
        want = py.process(frames, now, statuses)
        assert normalised(got) == normalised(want), (frames, statuses, now)
        # The same frames tunnelled by forward_to (queued ICMP errors): same bytes, no state.
        flows = len(py)
        got = c.forward_to(frames, 1 + step % 3)
        check_fits(frames, got)
        want = py.forward_to(frames, 1 + step % 3)
        assert normalised(got) == normalised(want), (frames, "forward_to")
        assert len(c) == len(py) == flows
    c_counters = c.counters()
    assert {k: c_counters[k] for k in py.counters()} == py.counters()
    assert c.expire(T0 + 10**9, 1 << 20) == py.expire(T0 + 10**9, 1 << 20)


def seeds() -> Iterable[bytes]:
    """Every golden frame alone (with and without CSUMNOTREADY), and each case's whole batch."""
    for case in CASES:
        statuses = list(case.main.statuses or ())
        yield encode(case.main.frames[:MAX_FRAMES], statuses)
        for f in case.main.frames[:2]:
            yield encode([f], [TP_STATUS_CSUMNOTREADY], step=7)


def write_corpus(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for i, seed in enumerate(seeds()):
        (directory / f"golden-{i:04d}").write_bytes(seed)
        count += 1
    return count


def main(argv: list[str]) -> None:
    """`python -m tests.fuzz.harness --write-corpus DIR`, or run atheris: see README.md."""
    if len(argv) == 3 and argv[1] == "--write-corpus":
        print(f"{write_corpus(Path(argv[2]))} seeds in {argv[2]}")
        return
    atheris: Any = importlib.import_module("atheris")  # optional: pip install atheris

    atheris.instrument_all()  # coverage feedback from the Python reference's branches
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
