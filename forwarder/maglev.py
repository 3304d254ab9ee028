"""Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016): backend set -> lookup table.

Pure and deterministic: every forwarder, in every POP, in C or Python, must build the same table
from the same backend set, because Maglev is the fallback that keeps flows on their backend when
the store cannot answer. Everything below that affects the table is part of that contract.

The contract, exactly (the C fast path reimplements it bit for bit):

1. Canonical order. Backends are ``(address, weight)`` with a 16-byte packed IPv6 address and an
   integer weight 0..65535. They are sorted by address bytes (``memcmp`` order); a table entry is
   an index into that order. Addresses must be unique. Weight-0 backends keep their index but get
   no slot.
2. Permutation of backend ``i`` with address ``a``::

       h1 = MurmurHash3_x64_128(a, 16, OFFSET_SEED) -> first 64-bit word (h1), unsigned
       h2 = MurmurHash3_x64_128(a, 16, SKIP_SEED)   -> first 64-bit word (h1), unsigned
       offset = h1 % size
       skip   = h2 % (size - 1) + 1
       permutation[i][j] = (offset + j * skip) % size     (exact integer maths, no wrap-around)

   "First 64-bit word" is ``out[0]`` of the reference ``MurmurHash3_x64_128``, i.e.
   ``mmh3.hash64(a, seed, signed=False)[0]``, i.e. the low 64 bits of ``mmh3.hash128(a, seed)``.
   C should walk the permutation incrementally (``pos += skip; if (pos >= size) pos -= size``):
   ``j * skip`` overflows 32 bits for the default size.
3. Filling: Katran's weighted Maglev (``MaglevHashV2``). ``max_w`` is the largest weight.
   Each backend has a credit, initially 0, and a cursor ``next``, initially 0. Repeat rounds;
   in each round visit the backends with weight > 0 in canonical order: ``credit += weight``;
   if ``credit >= max_w``: ``credit -= max_w``, then walk the backend's permutation from
   ``next`` to the first empty slot, give it to the backend, and set ``next`` past that slot.
   Stop the moment the last slot is filled (possibly mid-round). A backend of weight ``w``
   therefore takes ``w / max_w`` turns per round and owns ``size * w / sum(w)`` slots, give or
   take one or two.
4. Lookup: ``table[hash64 % size]``, with ``hash64`` from `flowstate.flow.FiveTuple.hash64`.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import mmh3

from flowstate.errors import ConfigError

#: Seed of the hash that gives a backend's offset. Part of the cross-POP contract.
OFFSET_SEED = 0x6D676C31  # "mgl1"
#: Seed of the hash that gives a backend's skip. Part of the cross-POP contract.
SKIP_SEED = 0x6D676C32  # "mgl2"
#: The paper's recommended table size: prime, and >= 100 x a few hundred backends.
DEFAULT_SIZE = 65537
#: Largest table size accepted. Bounds memory, and keeps the primality check trivial.
MAX_SIZE = 1 << 24
#: Largest weight accepted (weights fit in 16 bits in the config and the C path).
MAX_WEIGHT = 0xFFFF
#: Table entry meaning "no backend"; only an empty table holds it. Caps backends at 65535.
NO_BACKEND = 0xFFFF

ADDRESS_LEN = 16


def is_prime(n: int) -> bool:
    """Trial division; fine for n <= `MAX_SIZE`."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


def check_size(size: int) -> None:
    """Raise ConfigError unless `size` is a usable table size (a prime in 3..`MAX_SIZE`)."""
    if not isinstance(size, int) or isinstance(size, bool):
        raise ConfigError("maglev_size", f"must be an integer, got {size!r}")
    if not 3 <= size <= MAX_SIZE:
        raise ConfigError("maglev_size", f"must be between 3 and {MAX_SIZE}, got {size}")
    if not is_prime(size):
        raise ConfigError("maglev_size", f"{size} is not prime (try 65537, 131071 or 1048573)")


def permutation_params(address: bytes, size: int) -> tuple[int, int]:
    """``(offset, skip)`` of a backend's permutation of a table of `size` slots."""
    h1 = mmh3.hash64(address, OFFSET_SEED, signed=False)[0]
    h2 = mmh3.hash64(address, SKIP_SEED, signed=False)[0]
    return h1 % size, h2 % (size - 1) + 1


def canonical_backends(backends: Sequence[tuple[bytes, int]]) -> tuple[tuple[bytes, int], ...]:
    """Validate ``(address, weight)`` pairs and return them sorted by address bytes."""
    for address, weight in backends:
        if not isinstance(address, bytes) or len(address) != ADDRESS_LEN:
            raise ConfigError("backends", f"address must be 16 packed bytes, got {address!r}")
        if not isinstance(weight, int) or isinstance(weight, bool):
            raise ConfigError("backends", f"weight must be an integer, got {weight!r}")
        if not 0 <= weight <= MAX_WEIGHT:
            raise ConfigError("backends", f"weight must be 0..{MAX_WEIGHT}, got {weight}")
    ordered = tuple(sorted(backends, key=lambda b: b[0]))
    for (a, _), (b, _) in itertools.pairwise(ordered):
        if a == b:
            raise ConfigError("backends", f"duplicate backend address {a.hex()}")
    return ordered


def build_table(backends: Sequence[tuple[bytes, int]], size: int = DEFAULT_SIZE) -> array[int]:
    """Slot -> index into the canonical (address-sorted) backend order; see the module doc.

    With no backend of weight > 0 every slot holds `NO_BACKEND`.
    """
    return _fill(canonical_backends(backends), size)


def _fill(ordered: tuple[tuple[bytes, int], ...], size: int) -> array[int]:
    check_size(size)
    if len(ordered) >= size:
        raise ConfigError(
            "backends", f"{len(ordered)} backends need a table larger than {size} slots"
        )
    if len(ordered) > NO_BACKEND:
        raise ConfigError("backends", f"at most {NO_BACKEND} backends, got {len(ordered)}")

    table = array("H", [NO_BACKEND]) * size
    active = [i for i, (_, w) in enumerate(ordered) if w > 0]
    if not active:
        return table

    weights = [ordered[i][1] for i in active]
    max_w = max(weights)
    params = [permutation_params(ordered[i][0], size) for i in active]
    # `pos` is where each backend's next probe lands: permutation[i][next[i]].
    pos = [offset for offset, _ in params]
    skips = [skip for _, skip in params]
    credit = [0] * len(active)
    order = range(len(active))
    filled = 0
    while True:
        for k in order:
            c = credit[k] + weights[k]
            if c < max_w:
                credit[k] = c
                continue
            credit[k] = c - max_w
            p = pos[k]
            skip = skips[k]
            while table[p] != NO_BACKEND:
                p += skip
                if p >= size:
                    p -= size
            table[p] = active[k]
            p += skip
            pos[k] = p - size if p >= size else p
            filled += 1
            if filled == size:
                return table


@dataclass(frozen=True, slots=True)
class MaglevTable:
    """A built table and the canonical backend order its entries index."""

    backends: tuple[tuple[bytes, int], ...]
    """``(address, weight)`` sorted by address bytes; table entry ``k`` means ``backends[k]``."""
    table: array[int]
    """``size`` entries, each an index into `backends`, or `NO_BACKEND` when none is usable."""

    @classmethod
    def build(cls, backends: Sequence[tuple[bytes, int]], size: int = DEFAULT_SIZE) -> MaglevTable:
        """Validate, order and build; raises ConfigError on a bad size or backend list."""
        ordered = canonical_backends(backends)
        return cls(ordered, _fill(ordered, size))

    @property
    def size(self) -> int:
        return len(self.table)

    def lookup(self, hash64: int) -> bytes | None:
        """The backend address for a flow's `FiveTuple.hash64()`, or None if there is none."""
        index = self.table[hash64 % len(self.table)]
        if index == NO_BACKEND:
            return None
        return self.backends[index][0]

    def slot_counts(self) -> dict[bytes, int]:
        """Slots owned per backend address (weight-0 backends own 0): for `explain` and tests."""
        counts = dict.fromkeys((a for a, _ in self.backends), 0)
        for index in self.table:
            if index != NO_BACKEND:
                counts[self.backends[index][0]] += 1
        return counts
