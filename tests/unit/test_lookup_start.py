"""A miss's lookup starts from the receive callback (issue 6: route-change recovery).

The store loop is not running here: a flow new to the POP is looked up all the same, in a
round of its own, without waking the loop; once every round slot is taken, the flows left
wait for the store loop (its wake-up is set), which still owns writes and overflow rounds.
"""

from __future__ import annotations

import asyncio
from typing import Any

from forwarder import packet as P
from forwarder.service import MAX_ROUNDS, monotonic_ms
from tests.unit.test_store_rounds import CLIENT, VIP, HungStore, asked, forwarder, until


class FramesRing:
    """A ring whose next `run` reads the frames queued with `put` (pure logic: no socket)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def put(self, port: int) -> None:
        ack = P.tcp(CLIENT, VIP, port, 80, flags=P.TCP_ACK, ack=1)
        self.frames.append(P.frame(P.ipv4(CLIENT, VIP, ack, proto=6)))

    def run(self, engine: Any, now: int, budget: int) -> Any:
        frames, self.frames = self.frames[:budget], self.frames[budget:]
        return engine.process(frames, now)


def test_a_miss_is_looked_up_from_the_receive_callback_until_the_round_slots_are_taken() -> None:
    async def main() -> None:
        store = HungStore()
        fwd = forwarder(store)
        ring = FramesRing()
        try:
            for port in range(40000, 40000 + MAX_ROUNDS):
                ring.put(port)
                fwd._on_readable(ring)
                assert not fwd._wake.is_set()  # nothing left for the store loop
                assert await until(lambda p=port: p in asked(store)), store.calls
            assert len(store.calls) == MAX_ROUNDS and fwd._free_rounds == 0
            ring.put(41000)
            fwd._on_readable(ring)  # no slot free: the store loop's (overflow) business
            assert fwd._wake.is_set()
            await asyncio.sleep(0.01)
            assert 41000 not in asked(store)
            assert fwd.core.has_work(monotonic_ms(), writes=False)
            store.answer.set()  # not found: Maglev picks; the slots come back
            assert await until(lambda: fwd.core.counters["lookup_not_found"] == MAX_ROUNDS)
            assert await until(lambda: fwd._free_rounds == MAX_ROUNDS)
        finally:
            for task in list(fwd._tasks):
                task.cancel()
            await asyncio.gather(*fwd._tasks, return_exceptions=True)

    asyncio.run(main())
