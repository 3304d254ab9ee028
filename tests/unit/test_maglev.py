"""Weighted Maglev: golden tables (the C path's contract), balance, disruption, validation."""

from __future__ import annotations

import ipaddress
import random

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowstate.errors import ConfigError
from flowstate.flow import FiveTuple
from forwarder.maglev import (
    NO_BACKEND,
    OFFSET_SEED,
    SKIP_SEED,
    MaglevTable,
    build_table,
    is_prime,
    permutation_params,
)

_BASE = int(ipaddress.IPv6Address("2001:db8::"))


def addr(i: int) -> bytes:
    """2001:db8::<i>, packed."""
    return ipaddress.IPv6Address(_BASE + i).packed


A1, A2, A3 = addr(1), addr(2), addr(3)
THREE = [(A1, 100), (A2, 100), (A3, 100)]


# --- golden values: frozen once; a change here breaks cross-POP agreement -----------------------


def test_golden_hashes() -> None:
    # The two hashes behind offset and skip: first 64-bit word of MurmurHash3_x64_128.
    assert mmh3.hash64(A1, OFFSET_SEED, signed=False)[0] == 0x73C71B34E61CD0A3
    assert mmh3.hash64(A1, SKIP_SEED, signed=False)[0] == 0x593CCC5DE71D3D8A
    assert mmh3.hash64(A3, OFFSET_SEED, signed=False)[0] == 0x32D32F198DE6600F
    assert mmh3.hash64(A3, SKIP_SEED, signed=False)[0] == 0xFCCFF6332A777269


def test_golden_permutation_params() -> None:
    assert [permutation_params(a, 65537) for a in (A1, A2, A3)] == [
        (37365, 15755),
        (51364, 27958),
        (52848, 29290),
    ]
    assert [permutation_params(a, 13) for a in (A1, A2, A3)] == [(11, 3), (0, 6), (7, 6)]


def test_golden_size_13_by_hand() -> None:
    # Permutations (offset, skip): A1 (11, 3): 11 1 4 7 10 0 3 6 9 12 2 5 8
    #                              A2 (0, 6):   0 6 12 5 11 4 10 3 9 2 8 1 7
    #                              A3 (7, 6):   7 0 6 12 5 11 4 10 3 9 2 8 1
    # Equal weights, so every backend takes a turn every round, in address order:
    # round 1: A1->11, A2->0, A3->7      round 2: A1->1, A2->6, A3->12 (0, 6 taken)
    # round 3: A1->4, A2->5, A3->10      round 4: A1->3, A2->9, A3->2
    # round 5: A1->8 and the table is full.
    assert list(build_table(THREE, 13)) == [1, 0, 2, 0, 0, 1, 1, 2, 0, 1, 2, 0, 2]


def test_golden_size_13_weighted() -> None:
    # Weights 1:2:3, max 3: A3 fills every round, A2 in two rounds of three, A1 in one of three.
    table = build_table([(A1, 1), (A2, 2), (A3, 3)], 13)
    assert list(table) == [1, 0, 2, 2, 2, 2, 2, 2, 2, 1, 1, 0, 1]


def test_golden_size_65537_prefix() -> None:
    table = build_table(THREE)
    assert len(table) == 65537
    assert list(table[:20]) == [1, 1, 0, 0, 1, 1, 0, 0, 2, 0, 1, 2, 1, 1, 0, 1, 2, 0, 0, 2]


def test_golden_lookup_of_a_flow() -> None:
    table = MaglevTable.build(THREE)
    flow = FiveTuple.make("tcp", "192.0.2.10", 40000, "198.51.100.1", 80)
    h = flow.hash64()
    assert table.lookup(h) == table.backends[table.table[h % 65537]][0]
    assert table.lookup(h) in (A1, A2, A3)


# --- determinism ------------------------------------------------------------------------------


def test_input_order_does_not_matter() -> None:
    rng = random.Random(7)
    backends = [(addr(i), rng.randint(1, 100)) for i in range(1, 30)]
    reference = MaglevTable.build(backends)
    for _ in range(5):
        shuffled = backends[:]
        rng.shuffle(shuffled)
        other = MaglevTable.build(shuffled)
        assert other.backends == reference.backends
        assert other.table == reference.table
        assert build_table(shuffled) == reference.table


def test_canonical_order_is_address_bytes() -> None:
    table = MaglevTable.build([(A3, 1), (A1, 1), (A2, 1)])
    assert [a for a, _ in table.backends] == [A1, A2, A3]


# --- balance ----------------------------------------------------------------------------------


def _assert_shares_follow_weights(backends: list[tuple[bytes, int]], size: int) -> None:
    counts = MaglevTable.build(backends, size).slot_counts()
    total_weight = sum(w for _, w in backends)
    for address, weight in backends:
        ideal = size * weight / total_weight
        # Within 1% of the ideal share, or 2 slots for shares too small for 1% to be a slot.
        assert abs(counts[address] - ideal) <= max(0.01 * ideal, 2), (weight, counts[address])


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100])
def test_equal_weights_balance(n: int) -> None:
    _assert_shares_follow_weights([(addr(i), 100) for i in range(1, n + 1)], 65537)


@pytest.mark.parametrize("seed", range(5))
def test_unequal_weights_balance(seed: int) -> None:
    rng = random.Random(seed)
    backends = [(addr(i), rng.randint(1, 100)) for i in range(1, 11)]
    _assert_shares_follow_weights(backends, 65537)


def test_typical_weight_ratios() -> None:
    _assert_shares_follow_weights([(A1, 100), (A2, 50), (A3, 25)], 65537)
    _assert_shares_follow_weights([(A1, 1), (A2, 100)], 65537)


# --- minimal disruption -----------------------------------------------------------------------


def _moved_share(before: MaglevTable, after: MaglevTable, exclude: bytes) -> float:
    """Share of slots not owned by `exclude` in either table whose owner changed."""
    moved = kept = 0
    for old_index, new_index in zip(before.table, after.table, strict=True):
        old = before.backends[old_index][0]
        new = after.backends[new_index][0]
        if old == exclude or new == exclude:
            continue
        if old == new:
            kept += 1
        else:
            moved += 1
    return moved / (moved + kept)


@pytest.mark.parametrize("removed", [0, 4, 9])
def test_removing_a_backend_moves_few_other_slots(removed: int) -> None:
    backends = [(addr(i), 100) for i in range(1, 11)]
    before = MaglevTable.build(backends)
    gone = backends[removed][0]
    after = MaglevTable.build([b for b in backends if b[0] != gone])
    assert _moved_share(before, after, gone) < 0.02
    # The removed backend's slots all went to the others.
    assert gone not in {after.backends[i][0] for i in after.table}


def test_adding_a_backend_moves_few_other_slots() -> None:
    backends = [(addr(i), 100) for i in range(1, 11)]
    before = MaglevTable.build(backends)
    new = addr(0x99)
    after = MaglevTable.build([*backends, (new, 100)])
    assert _moved_share(before, after, new) < 0.02
    assert after.slot_counts()[new] == pytest.approx(65537 / 11, rel=0.01)


def test_weight_zero_is_like_removal_but_keeps_indices() -> None:
    backends = [(addr(i), 100) for i in range(1, 11)]
    drained = [(a, 0 if a == addr(5) else w) for a, w in backends]
    removed = [b for b in backends if b[0] != addr(5)]
    t_drained = MaglevTable.build(drained)
    t_removed = MaglevTable.build(removed)
    assert len(t_drained.backends) == 10
    assert t_drained.slot_counts()[addr(5)] == 0
    # Same slots, same owners: only the index numbering differs.
    assert [t_drained.backends[i][0] for i in t_drained.table] == [
        t_removed.backends[i][0] for i in t_removed.table
    ]


# --- edge cases and validation ----------------------------------------------------------------


def test_empty_backend_set_reports_no_backend() -> None:
    table = MaglevTable.build([], 13)
    assert list(table.table) == [NO_BACKEND] * 13
    assert table.lookup(12345) is None


def test_all_weights_zero_reports_no_backend() -> None:
    table = MaglevTable.build([(A1, 0), (A2, 0)], 13)
    assert table.lookup(0) is None
    assert table.backends == ((A1, 0), (A2, 0))


def test_single_backend_owns_everything() -> None:
    table = MaglevTable.build([(A2, 7)], 13)
    assert list(table.table) == [0] * 13
    assert table.lookup(2**64 - 1) == A2


@pytest.mark.parametrize("size", [0, 1, 2, 4, 65536, 65535, 1 << 25, True])
def test_bad_sizes_rejected(size: int) -> None:
    with pytest.raises(ConfigError) as info:
        build_table(THREE, size)
    assert info.value.field == "maglev_size"


def test_size_must_exceed_backend_count() -> None:
    with pytest.raises(ConfigError, match="larger than 13"):
        build_table([(addr(i), 1) for i in range(1, 14)], 13)


@pytest.mark.parametrize(
    "backends",
    [
        [(A1, 1), (A1, 2)],
        [(b"\x00" * 4, 1)],
        [(A1, -1)],
        [(A1, 65536)],
        [(A1, 1.5)],
        [(A1, True)],
    ],
)
def test_bad_backends_rejected(backends: list[tuple[bytes, int]]) -> None:
    with pytest.raises(ConfigError):
        build_table(backends, 13)


def test_is_prime() -> None:
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(65537) and is_prime(16777213) and not is_prime(65535)


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(0, 300), min_size=0, max_size=12),
    size=st.sampled_from([13, 31, 251, 1009]),
    first=st.integers(1, 0xFFFF),
)
def test_every_entry_indexes_a_weighted_backend(weights: list[int], size: int, first: int) -> None:
    backends = [(addr(first + i), w) for i, w in enumerate(weights)]
    table = MaglevTable.build(backends, size)
    assert len(table.table) == size
    if not any(weights):
        assert set(table.table) == {NO_BACKEND}
        return
    for index in table.table:
        assert index != NO_BACKEND
        assert table.backends[index][1] > 0
