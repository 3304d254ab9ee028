"""The fuzz target on its seeds and on deterministic mutations of them (no atheris needed)."""

from __future__ import annotations

import random

import pytest

from forwarder.fastpath import c_engine_available

if not c_engine_available():
    pytest.skip("forwarder._fastpath is not built", allow_module_level=True)

from tests.fuzz.harness import decode, encode, one_input, seeds


def test_encoding_round_trips() -> None:
    frames = [b"\x01\x02", b"", b"x" * 300]
    assert decode(encode(frames, [0, 8, 0], step=3)) == (frames, [0, 8, 0], 3)


def test_seeds() -> None:
    for seed in seeds():
        one_input(seed)


def test_mutated_seeds() -> None:
    rng = random.Random(0x666C6F77)
    corpus = list(seeds())
    for _ in range(3000):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.6 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind < 0.8 and data:
                del data[rng.randrange(len(data)) :]
            else:
                data += rng.randbytes(rng.randint(1, 16))
        one_input(bytes(data))
