"""The forwarder's store loop when every round in flight waits on a store that stopped
answering (all Redis nodes hung: the lab's redis-down fault).

The first flows' lookups took the MAX_ROUNDS round slots; flows that arrived after them used to
wait for a slot (a whole lookup deadline) before their own lookup was even sent, then for that
one: two deadlines before Maglev answered them. The store here is a stand-in whose lookups
never answer until the test lets them (the loop's scheduling is what is tested, not Redis).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from forwarder import packet as P
from forwarder.config import parse_config
from forwarder.service import LOOKUP_OVERFLOW_S, MAX_ROUNDS, Forwarder, make_engine, monotonic_ms

CLIENT, VIP = bytes([198, 51, 100, 7]), bytes([10, 0, 0, 1])


class HungStore:
    """Lookups wait until `answer` is set (then: not found); records each call's client ports."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.answer = asyncio.Event()

    async def lookup_many(self, flows: Sequence[Any], *, partial: bool = False) -> list[None]:
        self.calls.append([f.client_port for f in flows])
        await self.answer.wait()
        return [None] * len(flows)


def forwarder(store: HungStore) -> Forwarder:
    cfg = parse_config(
        {
            "pop": "lab",
            "interfaces": ["veth0"],
            "source_ipv6": "fd00::10",
            "impl": "python",
            "vip": [
                {
                    "address": "10.0.0.1",
                    "port": 80,
                    "protocol": "tcp",
                    "backend": [{"address": "fd00:b::1"}, {"address": "fd00:b::2"}],
                }
            ],
        }
    )
    return Forwarder(cfg, make_engine(cfg), [], store=store)  # type: ignore[arg-type]


def mid_flow_packet(fwd: Forwarder, port: int) -> None:
    """A packet of an established connection this POP does not know (after a route move)."""
    ack = P.tcp(CLIENT, VIP, port, 80, flags=P.TCP_ACK, ack=1)
    now = monotonic_ms()
    result = fwd.engine.process([P.frame(P.ipv4(CLIENT, VIP, ack, proto=6))], now)
    assert result.misses
    fwd.core.on_result(result, now)
    fwd._wake.set()


async def until(check: Any, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def asked(store: HungStore) -> set[int]:
    return {port for call in store.calls for port in call}


def test_a_flow_after_max_rounds_of_hung_lookups_is_asked_without_waiting_for_a_slot() -> None:
    async def main() -> None:
        store = HungStore()
        fwd = forwarder(store)
        loop_task = asyncio.create_task(fwd._store_loop())
        try:
            first = list(range(40000, 40000 + MAX_ROUNDS))
            for port in first:  # one round each: every slot holds a lookup that never answers
                mid_flow_packet(fwd, port)
                assert await until(lambda p=port: p in asked(store)), store.calls
            assert len(store.calls) == MAX_ROUNDS and fwd.overflow_rounds == 0
            mid_flow_packet(fwd, 41000)
            # Asked while every earlier lookup still hangs (before: only once one of them ended).
            assert await until(lambda: 41000 in asked(store)), store.calls
            assert not store.answer.is_set() and fwd.overflow_rounds == 1
            # Nothing waits now: no further round starts (the overflow is for waiting lookups).
            await asyncio.sleep(4 * LOOKUP_OVERFLOW_S)
            assert len(store.calls) == MAX_ROUNDS + 1
            store.answer.set()  # the store answers at last: not found, Maglev picks, all done
            done = MAX_ROUNDS + 1
            assert await until(lambda: fwd.core.counters["lookup_not_found"] == done)
            assert not fwd.core.has_work(monotonic_ms(), writes=False)
        finally:
            fwd._stopping.set()
            for task in [loop_task, *fwd._tasks]:
                task.cancel()
            await asyncio.gather(loop_task, *fwd._tasks, return_exceptions=True)

    asyncio.run(main())
