"""The slow path's pin queue stays bounded under a SYN flood, also while no store is connected.

(With a store the queue is trimmed whenever writes are taken; without one they never are, so the
trim must also happen where NEW events come in.)
"""

from __future__ import annotations

import pytest

from forwarder import packet as P
from forwarder.core import EVENT_NEW
from tests.unit.test_core import BACKENDS, CLIENT, IMPLS, NOW, VIP, make_pop

CAP = 100


@pytest.mark.parametrize("impl", IMPLS)
def test_pins_stay_bounded_without_a_store(impl: str) -> None:
    core = make_pop(impl, "pop-a", BACKENDS, max_writes_per_s=CAP)
    for batch in range(20):
        frames = [
            P.frame(P.ipv4(CLIENT, VIP, P.tcp(CLIENT, VIP, 1024 + batch * 50 + i, 80,
                                                flags=P.TCP_SYN), proto=6))
            for i in range(50)
        ]  # fmt: skip
        result = core.engine.process(frames, NOW + batch)
        assert sum(1 for e in result.events if e[0] == EVENT_NEW) == 50
        core.on_result(result, NOW + batch)
        # The service asks for work only with lookups queued, and with writes=False while
        # the store is not connected: a flood of SYNs alone never reaches take_store_work.
        assert not core.has_work(NOW + batch, writes=False)
    assert len(core._pins) == 4 * CAP
    assert core.counters["writes_rate_limited"] == 20 * 50 - 4 * CAP
